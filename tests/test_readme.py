"""The README's set-up and plugin examples are real: extract them, run them, talk to them.

Catches a README that drifts from the handler interface (renamed method, a
changed `configure` contract, a broken import), a set-up command that does
not work on a machine with only `python3`, and a `.ci/run` that no longer
runs the README's test command.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, running_server

from muxsrv.client import Client

README = (ROOT / "README.md").read_text(encoding="utf-8")


def python_blocks() -> dict[str, str]:
    """Code blocks whose first line is a comment naming a file: {"reverse.py": code}."""
    blocks = {}
    for code in re.findall(r"```python\n(.*?)```", README, re.S):
        m = re.match(r"# (\w+\.py)", code)
        if m:
            blocks[m.group(1)] = code
    return blocks


def test_readme_examples_exist() -> None:
    assert {"reverse.py", "counter.py", "test_counter.py", "test_reverse_check.py",
            "test_reverse_server.py"} <= set(python_blocks())


def test_harness_example_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    for name in ("counter.py", "test_counter.py"):
        (tmp_path / name).write_text(blocks[name])
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("counter", "test_counter"):
        sys.modules.pop(name, None)
    import test_counter  # type: ignore[import-not-found]

    tests = [getattr(test_counter, n) for n in dir(test_counter) if n.startswith("test_")]
    assert tests
    for test in tests:
        test()


def test_check_handler_example_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    for name in ("reverse.py", "counter.py", "test_reverse_check.py"):
        (tmp_path / name).write_text(blocks[name])
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("reverse", "counter", "test_reverse_check"):
        sys.modules.pop(name, None)
    import test_reverse_check  # type: ignore[import-not-found]

    tests = [getattr(test_reverse_check, n) for n in dir(test_reverse_check)
             if n.startswith("test_")]
    assert tests
    for test in tests:
        test()


def test_pytest_plugin_example_passes(tmp_path: Path) -> None:
    """The fixture example, run by pytest as its author runs it, in a folder of its own.

    Plugin autoloading is off and the plugin named with -p: this suite's own
    muxsrv may be installed (registering it again would be an error) or not.
    """
    blocks = python_blocks()
    for name in ("reverse.py", "counter.py", "test_reverse_server.py"):
        (tmp_path / name).write_text(blocks[name])
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "muxsrv.pytest_plugin", "test_reverse_server.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout, done.stdout


def test_function_example_runs(tmp_path: Path) -> None:
    (tmp_path / "reverse.py").write_text(python_blocks()["reverse.py"])
    env = {"PYTHONPATH": str(tmp_path)}
    with running_server("--handler", "reverse:reverse", env=env) as srv, Client(*srv.address) as c:
        assert c.request(b"stressed") == b"desserts"


def test_class_example_runs_with_its_own_option(tmp_path: Path) -> None:
    (tmp_path / "counter.py").write_text(python_blocks()["counter.py"])
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    with running_server("--handler", "counter:Counter", "--counter-start", "5", env=env) as srv:
        with Client(srv.host, srv.port) as c:
            assert c.pipeline([b"a", b"b"]) == [b"5: a", b"6: b"]
        with Client(srv.host, srv.port) as c:  # per-connection state starts afresh
            assert c.request(b"c") == b"5: c"
    bad = subprocess.run(
        [sys.executable, "-m", "muxsrv", "--handler", "counter:Counter", "--counter-start", "-1"],
        capture_output=True, text=True, env={"PYTHONPATH": f"{tmp_path}:{ROOT}"}, timeout=30,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["muxsrv: error: --counter-start must be 0 or more"]


def setup_section() -> str:
    return README.split("## Set-up", 1)[1].split("\n## ", 1)[0]


def setup_commands() -> tuple[str, str]:
    """The set-up section's two commands (one-line ``sh`` blocks, no prompt): run, test."""
    blocks = re.findall(r"```sh\n(.*?)```", setup_section(), re.S)
    commands = [b.strip() for b in blocks if b.count("\n") == 1 and not b.startswith("$")]
    assert len(commands) == 2, commands
    return commands[0], commands[1]


def test_setup_commands_need_only_python3() -> None:
    """Bug caught: `python` or a `pip` outside a virtual environment in the set-up, which
    Debian's own Python lacks or refuses (externally-managed-environment)."""
    run, test = setup_commands()
    assert run.startswith("python3 -m muxsrv ")
    steps = [step.split() for step in test.split("&&")]
    assert steps[0] == ["python3", "-m", "venv", ".venv"]
    assert all(step[0].startswith(".venv/bin/") for step in steps[1:]), steps
    assert "pytest" in steps[-1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """Bug caught: CI testing something other than what the README tells users to run."""
    _run, test = setup_commands()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [
        line for line in lines
        if line.strip() and not line.startswith("#") and line.split()[0] not in ("set", "cd")
        # the tests' own tools (haproxy, nginx, nc, OpenSSL's headers), installed when missing
        and not line.startswith(("command -v haproxy ", "command -v nginx ", "command -v nc ",
                                 "[ -e /usr/include/openssl/ssl.h ]"))
    ]
    assert commands == [test]


def test_readme_run_command_starts_a_server_that_answers() -> None:
    """Bug caught: a run command that does not start (a missing module, a wrong option, a
    `python` the machine lacks), or starts something that does not answer as the README says;
    and the README's client command beside it printing something else."""
    run, _test = setup_commands()
    argv = shlex.split(run)
    assert argv[0] == "python3"
    argv[0] = sys.executable
    srv = ServerProcess([], argv=argv)
    try:
        try:
            srv.wait_started()
        except AssertionError:
            # The README's port (9999) may be taken on this machine: then the same with any port.
            if "Address already in use" not in srv.final_log():
                raise
            srv = ServerProcess([], argv=[*argv, "--port", "0"])
            srv.wait_started()
        with Client(*srv.address) as c:
            assert c.request(b"hello") == b"HELLO"
        client_example(srv.port)
    finally:
        with suppress(subprocess.TimeoutExpired):  # stop() has killed it then
            srv.stop()


def client_example(port: int) -> None:
    """Run the set-up's client example (``$ python3 -m muxsrv.client ...``), check its output."""
    block = re.search(r"```sh\n\$ (python3 -m muxsrv\.client .*?)\n(.*?)```", setup_section(), re.S)
    assert block, "no client example in the set-up section"
    argv = shlex.split(block.group(1))
    argv[0] = sys.executable
    if port != 9999:
        argv += ["--port", str(port)]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == block.group(2)
