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
from pathlib import Path

import pytest
from support import ROOT, ServerProcess

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
