"""What a change costs muxsrv's hot path: callgrind instructions per request, before and after.

The idea: wall-clock benchmarks on a shared 2-core machine cannot see a few
per cent; instruction counts can.  The server runs under ``valgrind
--tool=callgrind`` (user-space instructions only), a plain Python client (not
under valgrind) warms it up, ``callgrind_control --zero`` starts the count,
a fixed number of 16-byte echoes runs, ``callgrind_control --dump`` ends it:
the count covers the requests and nothing of start-up or shutdown.  The same
is done for a git ref's tree (``git archive``, default ``main``) and for this
checkout, one after the other, and the table shows both and the change.

    python loadtest/bench/callgrind_cost.py                   # 100 conns, then 100 x 16 pipelined
    python loadtest/bench/callgrind_cost.py --base HEAD~3 --conns 1 --rounds 3000

The server under valgrind is slower than the client, so a turn of its loop
serves most of the connections at once (per-turn costs are spread over
them); with ``--conns 1`` every turn is one request's own.  Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRAME = struct.pack(">I", 16) + b"abcdefghijklmnop"


def drive(port: int, conns: int, depth: int, rounds: int, timeout: float = 600) -> None:
    """Closed loop: every connection keeps `depth` echoes in flight, `rounds` times."""
    sel = selectors.DefaultSelector()
    want = len(FRAME) * depth
    for _ in range(conns):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [0, 0])  # rounds done, bytes of this one
        sock.send(FRAME * depth)
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(5):
            sock, state = key.fileobj, key.data
            assert isinstance(sock, socket.socket)
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the server closed a connection")
            state[1] += len(data)
            if state[1] >= want:
                state[0], state[1] = state[0] + 1, 0
                if state[0] == rounds:
                    sel.unregister(sock)
                    sock.close()
                else:
                    sock.send(FRAME * depth)
    if sel.get_map():
        raise SystemExit("timed out")


def measure(tree: Path, conns: int, depth: int, warm: int, rounds: int, out: Path) -> int:
    """Instructions per request of muxsrv from `tree` in this scenario."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", sys.executable,
         "-m", "muxsrv", "--handler", "echo", "--host", "127.0.0.1", "--port", str(port),
         "--max-conns", "200000", "--idle-timeout", "0"],
        env=env, cwd=out.parent,  # (not here: ``-m`` would import the package from the cwd)
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)  # (valgrind's start-up: polled with a deadline)
        drive(port, conns, depth, warm)
        subprocess.run(["callgrind_control", "--zero", str(server.pid)], check=True,
                       capture_output=True)
        drive(port, conns, depth, rounds)
        subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True,
                       capture_output=True)
    finally:
        server.terminate()
        server.wait(60)
    dump = Path(f"{out}.{server.pid}.1")
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]) // (conns * depth * rounds)
    raise SystemExit(f"no total in {dump}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="the git ref to compare with (default main)")
    ap.add_argument("--conns", type=int, help="one scenario: this many connections")
    ap.add_argument("--depth", type=int, default=1, help="messages in flight per connection")
    ap.add_argument("--rounds", type=int, help="round trips per connection (measured)")
    args = ap.parse_args()
    scenarios = ([(args.conns, args.depth, args.rounds or max(20, 20_000 // args.conns))]
                 if args.conns else [(100, 1, 200), (100, 16, 20)])
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        print("| scenario | base | this tree | change |\n| --- | ---: | ---: | ---: |")
        for conns, depth, rounds in scenarios:
            warm = max(5, rounds // 10)
            before = measure(base, conns, depth, warm, rounds, Path(tmp) / "cg-base")
            after = measure(ROOT, conns, depth, warm, rounds, Path(tmp) / "cg-tree")
            print(f"| {conns} x {depth} | {before:,} | {after:,} | "
                  f"{(after - before) / before:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
