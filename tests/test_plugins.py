"""Handler plugins: the built-ins, both forms loaded by path or entry point, and errors
that name the culprit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support import (
    PLUGIN_DIR,
    PLUGINS,
    ROOT,
    ServerProcess,
    frame,
    plugin_env,
    recv_frame,
    recv_until_eof,
    running_server,
)

from muxsrv import cli, plugins
from muxsrv.handlers.builtin import echo, upper

pytestmark = pytest.mark.timeout(60)


def request(sock: socket.socket, payload: bytes) -> tuple[bool, bytes]:
    sock.sendall(frame(payload))
    return recv_frame(sock)


# -- the built-ins ------------------------------------------------------------------


def test_entry_points_in_pyproject_equal_builtins() -> None:
    """Bug caught: a built-in added, renamed or moved in one place and not the other."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["entry-points"][plugins.ENTRY_POINT_GROUP] == plugins.BUILTINS


@pytest.mark.parametrize("name", sorted(plugins.BUILTINS))
def test_every_builtin_loads(name: str) -> None:
    """Bug caught: a built-in's target pointing at nothing (found only when a user asks)."""
    loaded = plugins.load(plugins.find(name))
    assert loaded.plugin.source == "built-in"
    assert loaded.form in ("function", "class")


@pytest.mark.parametrize(
    ("payload", "want"),
    [
        ("héllo wörld".encode(), "HÉLLO WÖRLD".encode()),
        (b"\xffabc", b"\xffABC"),  # not UTF-8: ASCII rules, other bytes kept
        (b"mixed \xc3\xa9 \xff", b"MIXED \xc3\xa9 \xff"),
        (b"", b""),
        (b"ascii 123", b"ASCII 123"),
    ],
)
def test_upper(payload: bytes, want: bytes) -> None:
    """Bug caught: UTF-8 upper-cased bytewise (é unchanged) or invalid UTF-8 crashing."""
    assert upper(payload) == want


def test_echo_is_identity() -> None:
    payload = bytes(range(256))
    assert echo(payload) == payload


def test_upper_over_the_network_both_framings() -> None:
    with running_server("--handler", "upper") as srv, srv.connect() as sock:
        assert request(sock, "héllo wörld".encode()) == (False, "HÉLLO WÖRLD".encode())
        assert request(sock, b"\xffabc") == (False, b"\xffABC")
    with running_server("--handler", "upper", "--framing", "line") as srv, srv.connect() as sock:
        sock.sendall("héllo wörld\n".encode() + b"\xffabc\r\n")
        want = "HÉLLO WÖRLD\n".encode() + b"\xffABC\n"
        got = b""
        while len(got) < len(want):
            chunk = sock.recv(100)
            assert chunk
            got += chunk
        assert got == want


# -- plugins loaded by package.module:attribute ---------------------------------------


def test_function_plugin_by_import_path() -> None:
    """Bug caught: the package.module:attribute form not imported from PYTHONPATH."""
    with (
        running_server("--handler", f"{PLUGINS}:reverse", env=plugin_env()) as srv,
        srv.connect() as sock,
    ):
        assert request(sock, b"stressed") == (False, b"desserts")


def test_class_plugin_call_order_one_instance_per_connection() -> None:
    """Bugs caught: calls out of order (made -> message* -> eof -> lost), eof_received not
    called or its reply dropped, connection_lost missing or twice, instances shared."""
    with running_server("--handler", f"{PLUGINS}:Tracer", env=plugin_env()) as srv:
        first, second = srv.connect(), srv.connect()
        with first, second:
            assert request(first, b"a") == (False, b"a")
            _, record = request(first, b"trace")
            assert record.endswith(b" made message:a message:trace")
            number = record.split()[0]
            _, other = request(second, b"trace")
            assert other.split()[0] != number
            assert other.endswith(b" made message:trace")
            first.shutdown(socket.SHUT_WR)
            assert recv_until_eof(first) == frame(number + b" made message:a message:trace eof")
        line = srv.wait_log(rf"tracer {number.decode()} ")
        assert line.endswith(f"tracer {number.decode()} made message:a message:trace eof lost")
        # The second closed without a half-close of its own: its close is an EOF too.
        srv.wait_log(rf"tracer {other.split()[0].decode()} made message:trace eof lost")
        assert srv.stop() == 0
        log = srv.final_log()
        assert log.count(f"tracer {number.decode()} made") == 1


def test_class_plugin_options_and_config_error() -> None:
    """Bug caught: a class plugin's own options not parsed, or its ConfigError a traceback."""
    env = {**plugin_env()}
    cmd = [sys.executable, "-m", "muxsrv", "--handler", f"{PLUGINS}:Deferred"]
    run = subprocess.run([*cmd, "--help"], env=env, cwd=ROOT, capture_output=True, timeout=30)
    assert run.returncode == 0 and b"--deferred-delay" in run.stdout
    run = subprocess.run(
        [*cmd, "--deferred-delay", "-1"], env=env, cwd=ROOT, capture_output=True, timeout=30
    )
    assert run.returncode == 2
    assert run.stderr.decode() == "muxsrv: error: --deferred-delay must not be negative\n"


# -- entry points -----------------------------------------------------------------------


def _fake_distribution(where: Path) -> None:
    """A distribution that registers 'shout' in the muxsrv.handlers group."""
    info = where / "muxsrv_fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: muxsrv-fake-plugin\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[muxsrv.handlers]\nshout = {PLUGINS}:reverse\necho = muxsrv.handlers.builtin:echo\n"
    )


def test_entry_point_plugin_is_found_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug caught: third-party entry points ignored, or a re-registered built-in reported
    as coming from somewhere else."""
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    found = plugins.available()
    assert found["shout"].source == "entry point of muxsrv-fake-plugin"
    assert found["echo"].source == "built-in"
    assert plugins.load(found["shout"]).form == "function"
    env = plugin_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    with running_server("--handler", "shout", env=env) as srv, srv.connect() as sock:
        assert request(sock, b"abc") == (False, b"cba")


def _shadowing_distribution(where: Path) -> None:
    """A distribution that registers its own 'echo' (and an unrelated 'shout')."""
    info = where / "loud_echo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: loud-echo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[muxsrv.handlers]\necho = {PLUGINS}:reverse\nshout = {PLUGINS}:reverse\n"
    )


def test_a_plugin_cannot_shadow_a_builtin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug caught: an installed package registering 'echo' silently replaces the built-in
    while the start-up line still says 'handler echo'."""
    _shadowing_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    with pytest.raises(SystemExit) as info:
        cli.main(["--handler", "echo", "--port", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "muxsrv: error: handler 'echo' is provided by more than one distribution:"
        " built-in (muxsrv.handlers.builtin:echo) and loud-echo 1.0"
        f" ({PLUGINS}:reverse); give package.module:attribute to pick one\n"
    )
    # The other names are untouched, and the start-up line names each one's origin.
    assert plugins.load(plugins.find("upper")).describe == "upper (built-in)"
    assert plugins.load(plugins.find("shout")).describe == "shout (loud-echo 1.0)"
    env = plugin_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    with running_server("--handler", "shout", env=env) as srv:
        assert "(handler shout (loud-echo 1.0), framing length)" in srv.wait_log("listening")


def test_console_script_finds_a_module_in_the_current_folder(tmp_path: Path) -> None:
    """Bug caught: 'muxsrv --handler reverse:reverse' fails from the console script (its
    sys.path[0] is the script's folder, not the cwd) while 'python -m muxsrv' works."""
    (tmp_path / "reverse.py").write_text("def reverse(p: bytes) -> bytes:\n    return p[::-1]\n")
    script = Path(sys.executable).with_name("muxsrv")
    if not script.exists():
        pytest.skip("the muxsrv console script is not installed beside this python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's muxsrv, but not the cwd
    srv = ServerProcess([], env=env, argv=[str(script), "--handler", "reverse:reverse",
                                           "--port", "0"], cwd=tmp_path)
    try:
        srv.wait_started()
        assert "(handler reverse:reverse (reverse.py), framing length)" in srv.wait_log("listening")
        with srv.connect() as sock:
            assert request(sock, b"abc") == (False, b"cba")
    finally:
        srv.stop()
    (tmp_path / "reverse.py").unlink()
    run = subprocess.run(
        [str(script), "--handler", "reverse:reverse", "--port", "0"],
        cwd=tmp_path, env=env, capture_output=True, timeout=30, text=True,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("muxsrv: error: handler 'reverse:reverse'")
    assert "set PYTHONPATH to its folder" in run.stderr and run.stderr.count("\n") == 1


# -- plugin errors name the culprit ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("muxsrv_nosuch.module:fn",
         "handler 'muxsrv_nosuch.module:fn' (muxsrv_nosuch.module:fn, import path): importing"
         " module 'muxsrv_nosuch.module' failed: ModuleNotFoundError: No module named"
         " 'muxsrv_nosuch'"),
        ("muxsrv_testplugins.broken:echo",
         "importing module 'muxsrv_testplugins.broken' failed: ModuleNotFoundError: No module"
         " named 'muxsrv_testplugins_missing_dependency'"),
        (f"{PLUGINS}:nope", f"module '{PLUGINS}' has no 'nope'"),
        (f"{PLUGINS}:two_args", "a function handler must take exactly one argument"),
        (f"{PLUGINS}:NotAHandler", "class NotAHandler is not a subclass of muxsrv.Handler"),
        (f"{PLUGINS}:NOT_CALLABLE", "is a int; expected a function"),
        (f"{PLUGINS}:", "expected the form package.module:attribute"),
        ("nope", "unknown handler 'nope'; available: echo, exec, upper"),
    ],
    ids=["missing-module", "failing-import", "missing-attribute", "wrong-signature",
         "not-a-handler", "not-callable", "no-attribute", "unknown-name"],
)
def test_plugin_errors_name_the_culprit(
    name: str, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug caught: a broken plugin reported as a traceback, or without saying which one and
    why; a broken plugin accepted and failing later on the first message."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    with pytest.raises(plugins.PluginError) as info:
        plugins.load(plugins.find(name))
    assert expected in str(info.value)
    assert name.split(":")[0] in str(info.value)
    # The command line turns it into one line and exit status 2.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--handler", name, "--port", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"muxsrv: error: {info.value}\n"


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        ("Clash", "add_arguments() failed: ArgumentError: argument --port: conflicting option"
                  " string: --port"),
        ("ConfigureCrashes", "configure() raised KeyError: 'missing-setting'"),
    ],
)
def test_class_plugin_mistakes_are_one_line_naming_the_handler(
    attr: str, expected: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bug caught: a handler option clashing with --port, or a configure() raising something
    other than ConfigError, ends in an argparse traceback and exit status 1."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    with pytest.raises(SystemExit) as info:
        cli.main(["--handler", f"{PLUGINS}:{attr}", "--port", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"muxsrv: error: handler '{PLUGINS}:{attr}' ({PLUGINS}:{attr}, import path): {expected}\n"
    )


# -- the public API is typed ----------------------------------------------------------

TYPED_PLUGIN = '''
"""A handler written outside muxsrv, against its public API only."""
import argparse

from muxsrv import Client, ConfigError, Conn, Handle, Handler, ServerError, Timer
from muxsrv.testing import Harness


class Ticker(Handler):
    interval = 1.0

    @classmethod
    def configure(cls, options: argparse.Namespace) -> type[Handler]:
        if cls.interval <= 0:
            raise ConfigError("interval must be positive")
        return cls

    def connection_made(self, conn: Conn) -> None:
        self.timer: Timer | None = conn.loop.call_later(self.interval, self.tick, conn)
        self.soon: Handle = conn.loop.call_soon(self.tick, conn)
        peer = conn.peer
        self.host: str = peer[0] if peer is not None else "?"
        self.due: float = self.timer.when

    def tick(self, conn: Conn) -> None:
        conn.send(b"tick from " + self.host.encode())

    def connection_lost(self, conn: Conn, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


def check() -> list[bytes]:
    with Harness(Ticker) as h:
        h.advance(1.0)
        replies: list[bytes] = h.replies()
    with Client("127.0.0.1", 9999) as c:
        try:
            replies.append(c.request(b"x"))
        except ServerError as exc:
            replies.append(exc.message.encode())
    return replies
'''


def test_a_plugin_outside_the_package_passes_mypy_strict(tmp_path: Path) -> None:
    """Bugs caught: no py.typed (mypy cannot use the package: "missing library stubs or
    py.typed marker"), Timer/Handle/Client/ServerError not exported from muxsrv, parts of
    the handler API (conn.peer ...) typed Any so a plugin's own code goes unchecked."""
    (tmp_path / "ticker.py").write_text(TYPED_PLUGIN)
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    # On PYTHONPATH, not MYPYPATH: mypy then treats muxsrv as an installed package, which
    # it only reads if it carries py.typed.
    env["PYTHONPATH"] = str(ROOT)
    mypy = Path(sys.executable).with_name("mypy")
    run = subprocess.run(
        [str(mypy), "--strict", "--disallow-any-expr", "--no-incremental",
         "--cache-dir", str(tmp_path / "cache"), "--python-executable", sys.executable,
         "ticker.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "has type" not in run.stdout


def test_public_api_exported_with_docstrings_and_import_is_cheap() -> None:
    """Bugs caught: a name of the public API missing from muxsrv or undocumented; importing
    muxsrv (as every handler module does) pulling in the client, loop and testing code."""
    code = (
        "import sys, muxsrv\n"
        "heavy = sorted(m for m in ('muxsrv.client', 'muxsrv.loop', 'muxsrv.testing', 'socket')"
        " if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "for name in muxsrv.__all__:\n"
        "    if name != '__version__':\n"
        "        assert getattr(muxsrv, name).__doc__, name\n"
        "from muxsrv import Client, Handle, ServerError, Timer, testing\n"
        "from muxsrv.loop import Timer as T\n"
        "assert Timer is T and testing.Harness\n"
        "import importlib.resources\n"
        "assert importlib.resources.files('muxsrv').joinpath('py.typed').is_file()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, run.stderr
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["muxsrv"]  # shipped in wheels, not just in the checkout
