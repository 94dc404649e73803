"""--mux-attack: attackers beside the good users, in one Locust report, against a real server.

Locust runs as a user runs it (a subprocess, headless, a few seconds, --csv);
the good users' rows keep their own request type, the attackers' are of type
``attack``, named for how the server ended each attacking connection.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
from support import ROOT, running_server
from test_locust import (
    LOCUST_GRACE,
    LOCUSTFILE,
    LocustRun,
    free_port,
    locust_command,
    needs_locust,
    run_locust,
    tcp,
)

FRAME_TIMEOUT = "frame timeout: message not complete within 1 s"
OVERSIZE = "frame of 2147483647 bytes exceeds the limit of 16777216 bytes"


def attack_rows(run: LocustRun) -> dict[str, int]:
    return {name: int(row["Request Count"]) for (kind, name), row in run.rows.items()
            if kind == "attack"}


@needs_locust
@pytest.mark.timeout(90)
def test_attackers_are_reported_apart_and_closed_by_the_limit_that_answers_them(
    tmp_path: Path,
) -> None:
    """Bugs caught: attackers reported under the good users' type (the report could not
    tell what the attack did to good clients); an attacker not closed, or closed by
    another limit than the one the recipe names; good users failing beside them."""
    with running_server("--handler", "echo", "--frame-timeout", "1") as srv:
        run = run_locust(
            tmp_path,
            tcp(srv.host, srv.port),
            "--mux-attack", "slowloris,OversizeUser,garbage",
            "--mux-attack-users", "2",
            users=10,
            seconds=5,
        )  # fmt: skip
        log = srv.stderr_text()
    assert run.returncode == 0, run.describe()
    good = run.rows[("echo", "random bytes 64 B")]
    assert int(good["Request Count"]) > 100, run.describe()
    assert int(good["Failure Count"]) == 0, run.describe()
    attacks = attack_rows(run)
    # Closed between 1 and 1.25 s after the first byte: at least one each in 5 s.
    assert attacks.get(f"slowloris: closed: {FRAME_TIMEOUT}", 0) >= 2, attacks
    assert attacks.get(f"oversize: closed: {OVERSIZE}", 0) >= 10, attacks
    assert any(name.startswith("garbage ") for name in attacks), attacks
    assert not any(name.startswith(("slowloris: survived", "oversize: survived"))
                   for name in attacks), attacks
    assert re.search(rf"WARNING: closing 127\.0\.0\.1:\d+: {FRAME_TIMEOUT}", log), log[-3000:]
    assert re.search(rf"WARNING: closing 127\.0\.0\.1:\d+: {OVERSIZE}", log), log[-3000:]
    assert "this port speaks length-prefixed frames" in log, log[-3000:]


@needs_locust
@pytest.mark.timeout(60)
def test_attackers_from_their_own_address_meet_the_per_address_limit(tmp_path: Path) -> None:
    """Bugs caught: --mux-attack-from ignored (every user one address, so the limit
    could not be shown on one machine); good users refused with the attackers."""
    with running_server("--handler", "echo", "--max-conns-per-ip", "2") as srv:
        run = run_locust(
            tmp_path,
            tcp(srv.host, srv.port),
            "--mux-attack", "slowloris",
            "--mux-attack-users", "4",
            "--mux-attack-from", "127.0.0.2",
            users=6,
            seconds=4,
        )  # fmt: skip
        log = srv.stderr_text()
    assert run.returncode == 0, run.describe()
    good = run.rows[("echo", "random bytes 64 B")]
    assert int(good["Request Count"]) > 100 and int(good["Failure Count"]) == 0, run.describe()
    refused = "too many connections from your address (limit 2)"
    assert attack_rows(run).get(f"slowloris: closed: {refused}", 0) >= 2, attack_rows(run)
    assert re.search(rf"WARNING: refusing 127\.0\.0\.2:\d+: {re.escape(refused)}", log), log[-2000:]
    assert not re.search(r"refusing 127\.0\.0\.1:", log), log[-2000:]


@needs_locust
@pytest.mark.timeout(60)
def test_an_attacker_no_limit_answers_says_it_survived(tmp_path: Path) -> None:
    """Bug caught: an attacker the server never closed reported as closed (or not at all):
    the report must show that no limit held it."""
    locustfile = tmp_path / "short_hold.py"
    locustfile.write_text(
        "from muxsrv.locust import SlowlorisUser\n\n\n"
        "class ShortSlowloris(SlowlorisUser):\n"
        "    abstract = False\n"
        "    hold, interval = 1.0, 0.2\n"
    )
    with running_server("--handler", "echo", "--frame-timeout", "0") as srv:
        run = run_locust(tmp_path, tcp(srv.host, srv.port), locustfile=locustfile, users=2,
                         seconds=4)  # (the CSV is written once a second: room for it)
    assert run.returncode == 0, run.describe()
    attacks = attack_rows(run)
    assert attacks.get("slowloris: survived 1 s", 0) >= 2, run.describe()
    assert not any("closed" in name for name in attacks), attacks


@needs_locust
@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--mux-attack", "teardrop", "unknown attack 'teardrop'; choose from slowloris, "),
        ("--mux-attack-users", "0", "at least 1"),
    ],
)
def test_a_wrong_attack_option_is_refused_with_one_line(option: str, value: str,
                                                        why: str) -> None:
    host = f"tcp://127.0.0.1:{free_port()}"
    command = locust_command(LOCUSTFILE, "--headless", "-u", "1", "-t", "5s", "--host", host)
    proc = subprocess.run([*command, option, value], cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=LOCUST_GRACE)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err[-2000:]
    assert err.count("\n") == 1, err[-2000:]
    assert re.match(rf"\S+: error: argument {option}: ", err), err
    assert why in err, err


def test_attack_names_take_classes_names_and_all() -> None:
    """Parsed without Locust running (the function is plain): the names a user types.

    Locust is looked for, not imported: importing it here would monkey-patch this
    process with gevent (sockets, os.read, fork) for every test after this one."""
    if importlib.util.find_spec("locust") is None:
        pytest.skip("Locust is not installed")
    result = subprocess.run(
        [*locust_command(LOCUSTFILE)[:1], "-c",
         "from muxsrv.locust_attack import attack_names as a, ATTACKS\n"
         "assert a('SlowlorisUser,partial-frame, drip') == ['slowloris', 'partial', 'drip']\n"
         "assert a('all,churn') == list(ATTACKS) and len(ATTACKS) == 7\n"
         "assert a('churn,churn') == ['churn']\n"],
        cwd=ROOT, capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
