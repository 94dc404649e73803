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
        pytest.skip("this setuptools cannot build wheels: pip install wheel (or setuptools>=70.1)")
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
