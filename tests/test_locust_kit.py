"""The Locust kit as a plugin author gets it: from a wheel, outside the checkout.

The wheel is built from this checkout without the network (``pip wheel
--no-deps --no-build-isolation``) and unpacked with ``pip install --no-deps
--target`` into a folder of a temporary directory; a handler and a ten-line
locustfile written there run headless against a real server on an ephemeral
port, with only that folder (not the checkout) on the path.  The handler
sends two replies per message in ``line`` framing, so the run also shows
``replies=`` and the line reader at work; a check that expected one reply,
or the wrong bytes, would fail requests.

The client-side readers (``muxsrv.wire``) are tested with plain bytes; this
process never imports Locust (it would monkey-patch it with gevent).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, ServerProcess
from tls_certs import Certs

from muxsrv.wire import LineFrameDecoder, RawStream, encode, make_decoder

needs_locust = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="Locust is not installed"
)

HANDLER = '''\
from muxsrv import Conn, Handler


class Twice(Handler):
    def message_received(self, conn: Conn, payload: bytes) -> None:
        conn.send(payload)
        conn.send(payload[::-1])
'''

LOCUSTFILE = '''\
from locust import task

from muxsrv.locust import MuxUser


class TwiceUser(MuxUser):
    handler, framing = "twice", "line"

    @task
    def word(self) -> None:
        self.client.request(b"ab", replies=2, name="word", check=lambda s, got: got == [s, s[::-1]])
'''


def test_line_reader_cuts_at_newline_whole_and_byte_at_a_time() -> None:
    stream = b"one\ntwo\r\n\nlast"
    for step in (len(stream), 1):
        reader = LineFrameDecoder()
        got = []
        for i in range(0, len(stream), step):
            reader.receive_data(stream[i : i + step])
            while (f := reader.maybe_next_frame()) is not None:
                got.append(f.payload)
        assert got == [b"one", b"two\r", b""], step  # the \r is the reply's own byte
        assert reader.buffered == 4


def test_raw_reader_takes_sizes_or_whatever_arrived() -> None:
    reader = RawStream()
    assert reader.maybe_next_frame(None) is None
    reader.receive_data(b"abc")
    assert reader.maybe_next_frame(4) is None
    reader.receive_data(b"de")
    frame = reader.maybe_next_frame(4)
    assert frame is not None and frame.payload == b"abcd"
    rest = reader.maybe_next_frame(None)
    assert rest is not None and rest.payload == b"e"
    assert reader.maybe_next_frame(None) is None


def test_encode_every_framing() -> None:
    assert encode("length", b"hi") == b"\x00\x00\x00\x02hi"
    assert encode("line", b"hi") == b"hi\n"
    assert encode("raw", b"hi") == b"hi"
    with pytest.raises(ValueError, match="newline"):
        encode("line", b"a\nb")
    with pytest.raises(ValueError, match="unknown framing"):
        make_decoder("nope")


def test_import_without_locust_says_what_to_install() -> None:
    code = "import sys; sys.modules['locust'] = None; import muxsrv.locust"
    done = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "ImportError: muxsrv.locust needs Locust" in done.stderr, done.stderr
    assert "pip install 'muxsrv[loadtest]'" in done.stderr, done.stderr


def build_wheel(out: Path) -> Path:
    """A wheel of this checkout, built from a copy (setuptools writes build/ beside the source)."""
    src = out / "src"
    shutil.copytree(ROOT / "muxsrv", src / "muxsrv",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0 and "bdist_wheel" in done.stdout + done.stderr:
        pytest.fail("this setuptools cannot build wheels: the test extra installs wheel; "
                    "pip install wheel (or setuptools>=70.1)")
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("muxsrv-*.whl")
    return wheel


@needs_locust
def test_wheel_kit_runs_a_locustfile_written_outside_the_checkout(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    entry_points = next(site.glob("muxsrv-*.dist-info")).joinpath("entry_points.txt").read_text()
    assert "[pytest11]\nmuxsrv = muxsrv.pytest_plugin" in entry_points, entry_points
    work = tmp_path / "author"
    work.mkdir()
    (work / "twice.py").write_text(HANDLER)
    (work / "locustfile.py").write_text(LOCUSTFILE)
    assert len(LOCUSTFILE.splitlines()) <= 11
    # The wheel's muxsrv, and the author's folder; never the checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(work)])
    where = subprocess.run(
        [sys.executable, "-c", "import muxsrv.locust, muxsrv; print(muxsrv.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    # The wheel's pytest11 entry point: the fixture is there with no -p and no conftest.
    (work / "test_twice.py").write_text(
        "def test_twice(muxsrv_server):\n"
        "    srv = muxsrv_server('twice:Twice', '--framing', 'line')\n"
        "    srv.client.send(b'ab')\n"
        "    assert [srv.client.recv(), srv.client.recv()] == [b'ab', b'ba']\n"
    )
    tested = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_twice.py"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    srv = ServerProcess(
        ["--port", "0", "--handler", "twice:Twice", "--framing", "line"], env=env,
        argv=[sys.executable, "-m", "muxsrv", "--port", "0", "--handler", "twice:Twice",
              "--framing", "line"],
    )
    try:
        srv.wait_started()
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "2",
             "-r", "2", "-t", "3s", "--host", f"tcp://{srv.host}:{srv.port}", "--csv", "run",
             "--only-summary"],
            cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=40,
        )
    finally:
        srv.stop()
    with (work / "run_stats.csv").open(newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    word = rows[("twice", "word")]
    assert int(word["Request Count"]) > 20, word
    assert int(word["Failure Count"]) == 0, word


SHAPES_HANDLER = '''\
from muxsrv import Conn, Handler


class Shapes(Handler):
    """b"n:xyz" gets n replies (n = 0..9), each xyz; anything else its echo."""

    def message_received(self, conn: Conn, payload: bytes) -> None:
        count, colon, body = payload.partition(b":")
        if not colon:
            conn.send(payload)
            return
        for _ in range(int(count)):
            conn.send(body)
'''

SHAPES_LOCUSTFILE = '''\
import os

from locust import task

from muxsrv.locust import MuxUser

PORTS = dict(item.split("=") for item in os.environ["KIT_PORTS"].split(","))


class Counted(MuxUser):
    handler = "shapes"
    host = f"tcp://127.0.0.1:{PORTS['length']}"

    @task
    def shapes(self) -> None:
        self.client.request(b"0:x", replies=0, name="none")
        self.client.request(b"3:ab", replies=3, name="three",
                            check=lambda s, got: got == [b"ab"] * 3)
        self.client.request(b"2:z", replies=lambda got: len(got) == 2, name="until",
                            check=lambda s, got: got == [b"z", b"z"])
        if os.environ.get("KIT_MISCOUNT"):
            self.client.request(b"2:q", replies=1, name="miscounted")  # 2nd reply: next's


class Raw(MuxUser):
    handler = "raw-echo"
    framing = "raw"
    host = f"tcp://127.0.0.1:{PORTS['raw']}"

    @task
    def raw(self) -> None:
        self.client.pipeline([b"a" * 5000, b"bc"], name="raw", check=lambda s, r: r == s)
'''


def run_shapes(tmp_path: Path, miscount: bool) -> tuple[int, dict[str, dict[str, str]], str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "shapes.py").write_text(SHAPES_HANDLER)
    (tmp_path / "locustfile.py").write_text(SHAPES_LOCUSTFILE)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    shapes = ServerProcess(["--port", "0", "--handler", "shapes:Shapes"], env=env)
    raw = ServerProcess(["--port", "0", "--framing", "raw"], env=env)
    try:
        shapes.wait_started()
        raw.wait_started()
        run_env = dict(os.environ, **env, KIT_PORTS=f"length={shapes.port},raw={raw.port}")
        if miscount:
            run_env["KIT_MISCOUNT"] = "1"
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "2",
             "-r", "2", "-t", "3s", "--csv", "run", "--only-summary"],
            cwd=tmp_path, env=run_env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=40,
        )
    finally:
        shapes.stop()
        raw.stop()
    with (tmp_path / "run_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    return run.returncode, rows, run.stdout[-2000:] + run.stderr[-2000:]


@needs_locust
def test_zero_several_and_until_replies_and_raw_framing(tmp_path: Path) -> None:
    """Bugs caught: replies=0 waiting for a reply, a count or done function cutting the
    replies wrongly (the checks see every list), raw replies not cut by size."""
    status, rows, output = run_shapes(tmp_path, miscount=False)
    assert status == 0, output
    for name in ("none", "three", "until", "raw"):
        assert int(rows[name]["Request Count"]) > 10, (name, rows[name])
        assert int(rows[name]["Failure Count"]) == 0, (name, rows[name])


@needs_locust
def test_a_reply_beyond_the_count_fails_the_next_request(tmp_path: Path) -> None:
    """Bug caught: a stray reply silently dropped (or taken as the next request's
    success) instead of failing the check that sees it."""
    status, rows, output = run_shapes(tmp_path, miscount=True)
    assert status == 1, output
    # The stray b"q" is read by "none"'s successor, "three", whose list is then wrong.
    assert int(rows["three"]["Failure Count"]) > 0, rows["three"]
    assert int(rows["raw"]["Failure Count"]) == 0, rows["raw"]


# -- TLS and tokens: --host tls://, --mux-tls-ca, --mux-token-file ------------------

SECURE_LOCUSTFILE = '''\
import os
import random

from locust import task

from muxsrv.locust import MuxUser


class Secure(MuxUser):
    framing = os.environ["KIT_FRAMING"]

    @task
    def echo(self) -> None:
        rng = random.Random()
        size = 100_000 if self.framing == "length" else 3000  # no \\n, no \\r: line-safe
        payloads = [bytes(rng.randrange(14, 256) for _ in range(rng.randrange(size)))
                    for _ in range(4)]
        self.client.pipeline(payloads, name="echo", check=lambda sent, got: got == sent)
'''

TOKEN = "kit-token-" + "7" * 24  # never to be seen in any output


def run_secure(tmp_path: Path, srv: ServerProcess, framing: str, *options: str,
               host: str | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "locustfile.py").write_text(SECURE_LOCUSTFILE)
    env = dict(os.environ, KIT_FRAMING=framing,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "2",
         "-r", "2", "-t", "2s", "--host", host or f"tls://127.0.0.1:{srv.port}",
         *options, "--csv", "run", "--only-summary"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=40,
    )
    rows: dict[str, Any] = {}
    if (tmp_path / "run_stats.csv").exists():
        with (tmp_path / "run_stats.csv").open(newline="") as f:
            rows = {row["Name"]: row for row in csv.DictReader(f)}
    if (tmp_path / "run_failures.csv").exists():
        rows["failures"] = (tmp_path / "run_failures.csv").read_text()
    return run, rows


@pytest.fixture
def secure_server(certs: Certs, tmp_path: Path, request: pytest.FixtureRequest,
                  ) -> Iterator[ServerProcess]:
    """A TLS server with a token, on 127.0.0.1 (or the address after the framing: "line@HOST")."""
    framing, _, host = request.param.partition("@")
    tokens = tmp_path / "server-tokens"
    tokens.write_text(f"# the server's\n{TOKEN}\n")
    srv = ServerProcess(["--port", "0", "--host", host or "127.0.0.1", "--framing", framing,
                         "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                         "--auth-token-file", str(tokens)])
    try:
        yield srv.wait_started()
    finally:
        srv.stop()


@needs_locust
@pytest.mark.parametrize("secure_server", ["length", "line"], indirect=True)
def test_tls_and_token_zero_failures_byte_exact(
        certs: Certs, tmp_path: Path, secure_server: ServerProcess) -> None:
    """Bugs caught: no AUTH sent (every request refused), the OK taken for a reply, a
    TLS read that loses or reorders bytes (the check compares byte for byte)."""
    srv = secure_server
    framing = srv.args[srv.args.index("--framing") + 1]
    tokens = tmp_path / "mine"
    tokens.write_text(f"\n# comment\n  {TOKEN}  \nsecond-token-xxxxxxxxxxxx\n")
    run, rows = run_secure(tmp_path, srv, framing, "--mux-token-file", str(tokens),
                           "--mux-tls-ca", str(certs.ca))
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert int(rows["echo"]["Request Count"]) > 20, rows["echo"]
    assert int(rows["echo"]["Failure Count"]) == 0, rows
    assert TOKEN not in output and TOKEN not in srv.stderr_text()


@needs_locust
@pytest.mark.parametrize("secure_server", ["length"], indirect=True)
def test_wrong_token_and_wrong_ca_count_as_failures(
        certs: Certs, tmp_path: Path, secure_server: ServerProcess) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-at-all-0123456789\n")
    run, rows = run_secure(tmp_path / "a", secure_server, "length", "--mux-token-file",
                           str(wrong), "--mux-tls-ca", str(certs.ca))
    assert run.returncode == 1, (run.stdout + run.stderr)[-3000:]
    assert int(rows["echo"]["Failure Count"]) > 0 and rows["echo"]["Request Count"] == \
        rows["echo"]["Failure Count"], rows
    assert "authentication failed" in rows["failures"] or "too many failed" in rows["failures"]
    assert "not-the-token" not in run.stdout + run.stderr + rows["failures"]
    # A CA that did not sign the server's certificate: the handshake fails, every request too.
    stranger_ca = certs.stranger_cert.parent / "strangerca.pem"
    run, rows = run_secure(tmp_path / "b", secure_server, "length", "--mux-token-file",
                           str(wrong), "--mux-tls-ca", str(stranger_ca))
    assert run.returncode == 1
    assert rows["echo"]["Request Count"] == rows["echo"]["Failure Count"] != "0", rows
    assert "CERTIFICATE_VERIFY_FAILED" in rows["failures"], rows["failures"]


@needs_locust
@pytest.mark.parametrize("secure_server", ["length@127.0.0.2"], indirect=True)
def test_host_name_is_verified(certs: Certs, tmp_path: Path,
                               secure_server: ServerProcess) -> None:
    """The certificate names 127.0.0.1 and localhost, not 127.0.0.2 (still this machine)."""
    tokens = tmp_path / "mine"
    tokens.write_text(TOKEN + "\n")
    run, rows = run_secure(tmp_path, secure_server, "length", "--mux-token-file", str(tokens),
                           "--mux-tls-ca", str(certs.ca),
                           host=f"tls://127.0.0.2:{secure_server.port}")
    assert run.returncode == 1
    assert rows["echo"]["Request Count"] == rows["echo"]["Failure Count"] != "0", rows
    assert "IP address mismatch" in rows["failures"], rows["failures"]


@needs_locust
@pytest.mark.parametrize(("make", "says"), [
    (lambda d: ["--mux-token-file", str(d / "missing")], "--mux-token-file"),
    (lambda d: ["--mux-token-file", str(d / "short")], "at least 16 bytes"),
    (lambda d: ["--mux-tls-ca", str(d / "missing-ca.pem")], "--mux-tls-ca"),
    (lambda d: ["--mux-tls-ca", str(d / "short")], "cannot load the CA"),
])
def test_bad_kit_options_are_refused_at_start(tmp_path: Path, make: Any, says: str) -> None:
    (tmp_path / "short").write_text("tooshort\n")
    (tmp_path / "locustfile.py").write_text(SECURE_LOCUSTFILE)
    env = dict(os.environ, KIT_FRAMING="length",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "1",
         "-t", "1s", "--host", "tls://127.0.0.1:9", *make(tmp_path)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=40,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert says in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "tooshort" not in run.stderr


@needs_locust
def test_tls_ca_with_a_tcp_host_is_refused(certs: Certs, tmp_path: Path) -> None:
    (tmp_path / "locustfile.py").write_text(SECURE_LOCUSTFILE)
    env = dict(os.environ, KIT_FRAMING="length",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "1",
         "-t", "1s", "--host", "tcp://127.0.0.1:9", "--mux-tls-ca", str(certs.ca)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=40,
    )
    assert run.returncode == 2 and "--mux-tls-ca is for tls:// hosts" in run.stderr, run.stderr
