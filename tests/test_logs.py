"""The log: --log-level per area, --log-format json, --log-file reopened on SIGHUP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ServerProcess, frame, recv_frame, running_server, wait_for

from muxsrv import logs
from muxsrv.client import Client

# -- --log-level -------------------------------------------------------------------


def test_levels_parse_root_and_areas() -> None:
    """Bug caught: a LOGGER=LEVEL entry taken as a level, or the order lost (later wins)."""
    assert logs.log_levels("info") == [("", logging.INFO)]
    assert logs.log_levels("DEBUG, muxsrv.exec=warning,muxsrv.conn = error") == [
        ("", logging.DEBUG), ("muxsrv.exec", logging.WARNING), ("muxsrv.conn", logging.ERROR)]
    assert logs.log_levels("myplugin.sub=debug") == [("myplugin.sub", logging.DEBUG)]
    assert logs.flatten([[("", logging.ERROR)], [("muxsrv.exec", logging.DEBUG)]]) == [
        ("", logging.INFO), ("", logging.ERROR), ("muxsrv.exec", logging.DEBUG)]
    assert logs.flatten(None) == [("", logging.INFO)]


@pytest.mark.parametrize(("text", "said"), [
    ("loud", "invalid choice: 'loud'"),
    ("muxsrv.exec=loud", "invalid choice: 'loud'"),
    ("muxsrv.exce=warning", "unknown logger 'muxsrv.exce'"),
    ("=warning", "not a logger name"),
    ("9x=info", "not a logger name"),
    ("", "invalid choice: ''"),
])
def test_bad_levels_are_refused(text: str, said: str) -> None:
    """Bug caught: a typo in an area silently filtering nothing."""
    with pytest.raises(argparse.ArgumentTypeError, match=said):
        logs.log_levels(text)


# -- the JSON formatter ----------------------------------------------------------


def record(msg: str, *args: object, level: int = logging.INFO,
           **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("muxsrv.test")
    return logger.makeRecord(logger.name, level, __file__, 1, msg, args, None, extra=extra)


def test_json_has_the_fields_in_order() -> None:
    """Bug caught: a missing key, the message unrendered, an extra field lost."""
    rec = record("closing %s: %s", "10.0.0.1:5", "idle", peer="10.0.0.1:5", pid=42)
    rec.created, rec.msecs = 1_800_000_000.25, 250.0
    obj = json.loads(logs.JsonFormatter({"worker": 7}).format(rec))
    assert list(obj) == ["time", "level", "logger", "event", "peer", "worker", "pid"]
    assert obj == {"time": "2027-01-15T08:00:00.250Z", "level": "INFO", "logger": "muxsrv.test",
                   "event": "closing 10.0.0.1:5: idle", "peer": "10.0.0.1:5", "worker": 7,
                   "pid": 42}


def test_json_without_peer_and_with_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("handler failed", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
    obj = json.loads(logs.JsonFormatter().format(rec))
    assert obj["peer"] is None and obj["level"] == "ERROR"
    assert "ValueError: boom" in obj["exc"] and "Traceback" in obj["exc"]


def test_json_is_one_line_whatever_the_client_sent() -> None:
    """Bug caught: a client's newline in an event forging a log line of its own."""
    evil = 'x"\n{"level": "ERROR"}\r\x00\u2028'
    line = logs.JsonFormatter().format(record("got %s", evil, peer=evil, thing=object()))
    assert "\n" not in line and "\r" not in line
    obj = json.loads(line)
    assert obj["event"] == f"got {evil}" and obj["peer"] == evil
    assert obj["thing"].startswith("<object object")  # not serialisable: its str()


# -- the file and configure --------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in logs.AREAS})
    yield
    for handler in logs._installed:
        root.removeHandler(handler)
        handler.close()
    logs._installed.clear()
    root.setLevel(saved[0])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def read_json(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_reopen_follows_a_rename(tmp_path: Path) -> None:
    """Bug caught: after logrotate's rename, lines still going to the renamed file."""
    path = tmp_path / "muxsrv.log"
    handler = logs.configure([("", logging.INFO), ("muxsrv.exec", logging.WARNING)], "json",
                             str(path))
    assert handler is not None and logs.has_file()
    log = logging.getLogger("muxsrv.conn")
    log.info("one")
    logging.getLogger("muxsrv.exec").info("silenced")
    logging.getLogger("muxsrv.exec").warning("kept")
    path.rename(tmp_path / "muxsrv.log.1")
    log.info("two")  # the old file, until SIGHUP
    assert logs.reopen() == f"reopened --log-file {path}"
    log.info("three")
    assert [o["event"] for o in read_json(tmp_path / "muxsrv.log.1")] == ["one", "kept", "two"]
    assert [o["event"] for o in read_json(path)] == ["three"]


@pytest.mark.usefixtures("restore_logging")
def test_reopen_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    """Bug caught: a failed reopen losing every later line (or raising into the loop)."""
    where = tmp_path / "d"
    where.mkdir()
    path = where / "muxsrv.log"
    logs.configure([("", logging.INFO)], "text", str(path))
    where.rename(tmp_path / "gone")  # the path's directory no longer exists
    assert logs.reopen() == "kept the log file opened before"
    logging.getLogger("muxsrv").info("still here")
    text = (tmp_path / "gone" / "muxsrv.log").read_text()
    assert "muxsrv ERROR: cannot reopen --log-file" in text
    assert text.splitlines()[-1].endswith("muxsrv INFO: still here")


@pytest.mark.usefixtures("restore_logging")
def test_configure_replaces_its_own_handler_only(tmp_path: Path) -> None:
    """Bug caught: a second configure doubling every line, or removing others' handlers."""
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    try:
        logs.configure([("", logging.INFO)], "text", str(tmp_path / "a.log"), worker=True)
        logs.configure([("", logging.INFO)], "text", str(tmp_path / "b.log"), worker=True)
        logging.getLogger("muxsrv.workers").info("hello")
        assert other in root.handlers
        assert (tmp_path / "a.log").read_text() == ""
        assert (tmp_path / "b.log").read_text().rstrip().endswith(
            f" muxsrv worker {os.getpid()} INFO: hello")
        assert logs.reopen().startswith("reopened")
    finally:
        root.removeHandler(other)


@pytest.mark.usefixtures("restore_logging")
def test_stderr_has_no_file_to_reopen() -> None:
    logs.configure([("", logging.INFO)], "text")
    assert not logs.has_file()
    assert logs.reopen() == "the log goes to stderr (no log file to reopen)"


# -- the server's own log, as a process --------------------------------------------


def events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_json_file_with_peer_and_areas_filtered(tmp_path: Path) -> None:
    """Bug caught: exec's per-command lines not silenced by muxsrv.exec=warning, an area's
    level ignored, a connection's line without its peer, the start-up line reformatted or
    in the file only."""
    path = tmp_path / "muxsrv.log"
    with running_server("--handler", "exec", "--exec-cwd", str(tmp_path), "--log-format",
                        "json", "--log-file", str(path), "--idle-timeout", "0.3", "--log-level",
                        "info,muxsrv.exec=warning", "--log-level", "muxsrv.server=error") as srv:
        assert srv.lines[0].startswith("muxsrv: listening on 127.0.0.1:")  # on stderr, as ever
        with Client(srv.host, srv.port, timeout=10) as c:
            assert c.exec("true").exit_code == 0
            assert c.exec("exit 3").exit_code == 3
            port = c._sock.getsockname()[1]
            wait_for(lambda: "idle for" in path.read_text(), what="the idle close")
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    lines = events(path)
    assert lines[0]["event"] == srv.lines[0].removeprefix("muxsrv: ")
    assert not [o for o in lines if o["logger"] in ("muxsrv.exec", "muxsrv.server")], lines
    closed = [o for o in lines if o["logger"] == "muxsrv.conn"]
    assert closed[0]["peer"] == f"127.0.0.1:{port}", lines
    assert str(closed[0]["event"]).startswith(f"closing 127.0.0.1:{port}: idle for")
    assert lines[-1]["event"] == "stopped" and lines[-1]["logger"] == "muxsrv"
    assert all(list(o)[:5] == ["time", "level", "logger", "event", "peer"] for o in lines)
    assert not [line for line in srv.lines[1:] if line.strip()]  # the rest went to the file


def test_exec_lines_carry_their_fields(tmp_path: Path) -> None:
    """Bug caught: exec's fields (pid, exit, seconds) only inside the text of the event."""
    path = tmp_path / "muxsrv.log"
    with running_server("--handler", "exec", "--exec-cwd", str(tmp_path), "--log-format",
                        "json", "--log-file", str(path)) as srv:
        with Client(srv.host, srv.port, timeout=10) as c:
            assert c.exec("exit 3").exit_code == 3
        wait_for(lambda: [o for o in events(path) if "exit" in o], what="the exit line")
    started, done = [o for o in events(path) if o["logger"] == "muxsrv.exec"][:2]
    assert started["pid"] == done["pid"] and isinstance(done["pid"], int)
    assert done["exit"] == 3 and isinstance(done["seconds"], float)
    assert done["peer"] == started["peer"] and str(done["peer"]).startswith("127.0.0.1:")


def test_sighup_reopens_the_file(tmp_path: Path) -> None:
    """Bug caught: lines going on into the rotated file after SIGHUP (logrotate's create)."""
    path = tmp_path / "muxsrv.log"
    with running_server("--log-file", str(path), "--idle-timeout", "0.2") as srv:
        wait_for(lambda: path.exists() and "listening on" in path.read_text())
        path.rename(tmp_path / "muxsrv.log.1")
        srv.signal(signal.SIGHUP)
        wait_for(path.exists, what="the new file")
        with srv.connect() as sock:  # a line after the SIGHUP: its idle close
            sock.sendall(frame(b"x"))
            assert recv_frame(sock) == (False, b"x")
            wait_for(lambda: "idle for" in path.read_text(), what="the idle close")
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    old, new = (tmp_path / "muxsrv.log.1").read_text(), path.read_text()
    assert "listening on" in old and "idle for" not in old
    assert "SIGHUP: reopened --log-file" in new and new.rstrip().endswith("muxsrv INFO: stopped")


def test_workers_name_themselves_and_all_reopen(tmp_path: Path) -> None:
    """Bug caught: workers' lines that do not say which worker, and with --workers a
    SIGHUP after logrotate leaving the serving workers writing to the rotated file."""
    path = tmp_path / "muxsrv.log"
    srv = ServerProcess(["--port", "0", "--workers", "2", "--log-format", "json",
                         "--log-file", str(path)])
    try:
        srv.wait_started()

        def serving(gen: int) -> bool:
            return any(f"generation {gen} serving" in str(o["event"]) for o in events(path))

        wait_for(lambda: serving(1), what="generation 1")
        first = {o["worker"] for o in events(path) if "worker" in o}
        assert len(first) == 2, events(path)
        path.rename(tmp_path / "muxsrv.log.1")
        srv.signal(signal.SIGHUP)
        wait_for(lambda: serving(2), timeout=20, what="generation 2")
        wait_for(lambda: {o.get("worker") for o in events(path)
                          if str(o["event"]).startswith("SIGHUP: reopened")} >= first,
                 what="every first-generation worker reopening")
        srv.signal(signal.SIGTERM)
        assert srv.wait(20) == 0
    finally:
        if srv.proc.poll() is None:
            srv.kill()
    lines = events(path)
    assert all(("worker" in o) != ("supervisor" in o) for o in lines), lines
    assert {o["supervisor"] for o in lines if "supervisor" in o} == {srv.pid}
    assert {o["worker"] for o in lines if "worker" in o} > first  # the second generation too


def test_json_on_stderr_after_the_start_up_line() -> None:
    """Bug caught: --log-format json without --log-file writing text, or the start-up
    line turned into JSON (tools parse it as it is)."""
    with running_server("--log-format", "json") as srv:
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        log = srv.final_log().splitlines()
    assert log[0].startswith("muxsrv: listening on 127.0.0.1:")
    objects = [json.loads(line) for line in log[1:]]
    assert objects[-1]["event"] == "stopped" and objects[-1]["logger"] == "muxsrv"
    assert not any("worker" in o or "supervisor" in o for o in objects)
    assert not [o for o in objects if str(o["event"]).startswith("listening on")]  # file only
