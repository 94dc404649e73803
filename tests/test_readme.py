"""The README's plugin examples are real: extract them, run them, talk to them.

Catches a README that drifts from the handler interface (renamed method, a
changed `configure` contract, a broken import) and a `.ci/run` that no longer
runs the README's test command.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, running_server

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
    assert {"reverse.py", "counter.py", "test_counter.py"} <= set(python_blocks())


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


def test_ci_runs_the_readme_test_command() -> None:
    command = "python -m pip install -e '.[test]' && python -m pytest"
    assert command in README
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines
