"""The end of a Locust run: the server's latency beside Locust's, and a final ``--csv``.

Two things happen when Locust quits (its ``quit`` event: every user stopped,
its tables printed), in the process that prints them (not a ``--processes``
worker):

* ``--csv PREFIX``: Locust's ``PREFIX_stats.csv``, ``_failures.csv`` and
  ``_exceptions.csv`` are written once more.  Locust writes them every second
  while it runs, and not after the last requests, so the ``Aggregated`` row
  could lag the totals it printed by up to a second's requests.
* ``--mux-admin HOST:PORT``: the server's ``GET /stats`` (its admin
  listener) is fetched, and its latency percentiles, per handler, are printed
  under Locust's own, in the same milliseconds but to the microsecond
  (Locust rounds below 100 ms to whole milliseconds, and measures from the
  client, the network and its own scheduling included), and written, in
  microseconds as /stats gives them, to ``PREFIX_server.csv``.  The token of
  ``--mux-token-file``, if any, goes as ``Authorization: Bearer``.  An admin
  port that does not answer is one error line; the run's exit status stays
  Locust's.

The CSV is written before /stats is fetched: the fetch yields to other
greenlets, and nothing may change the figures between Locust's table and the
file.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Final

from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from .client_stat import AdminError, fetch
from .locust_options import option, token_from

__all__ = ["SERVER_COLUMNS", "server_rows", "side_by_side", "write_final_csv"]

log = logging.getLogger("muxsrv.locust")
console = logging.getLogger("locust.stats_logger")  # where Locust prints its tables

#: PREFIX_server.csv's columns: /stats's own names, microseconds.
SERVER_COLUMNS: Final = ("Handler", "Count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us")
_SHOWN: Final = ((0.5, "p50_us", "50%"), (0.9, "p90_us", "90%"), (0.99, "p99_us", "99%"),
                 (0.999, "p999_us", "99.9%"), (1.0, "max_us", "max"))
FETCH_TIMEOUT: Final = 5.0
_environment: list[Environment] = []


@events.init.add_listener  # type: ignore[untyped-decorator]
def _remember(environment: Environment, **_: Any) -> None:
    _environment[:] = [environment]


@events.quit.add_listener  # type: ignore[untyped-decorator]
def _on_quit(**_: Any) -> None:
    if not _environment or isinstance(_environment[0].runner, WorkerRunner):
        return
    environment = _environment[0]
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        write_final_csv(environment, prefix)
    admin = option(environment, "mux_admin", None)
    if admin is None:
        return
    host, port = admin  # parse_admin's, as Locust's parser took it
    where = f"{host}:{port}"
    token_file = option(environment, "mux_token_file", None)
    try:
        stats = fetch(host, port, FETCH_TIMEOUT,
                      token_from(token_file) if token_file is not None else None)
    except AdminError as exc:
        log.error("--mux-admin: %s; no server-side figures", exc)
        return
    latency = stats.get("latency")
    if not isinstance(latency, dict):
        log.error("--mux-admin %s: /stats has no latency; no server-side figures", where)
        return
    for line in side_by_side(environment, latency, where):
        console.info("%s", line)
    if prefix:
        path = Path(prefix + "_server.csv")
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(SERVER_COLUMNS)
            writer.writerows([name, count, *values] for name, count, values in server_rows(latency))


def write_final_csv(environment: Environment, prefix: str) -> None:
    """PREFIX_stats.csv, _failures.csv and _exceptions.csv from the final figures."""
    stats_csv = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, columns, rows in (
        ("_stats.csv", stats_csv.requests_csv_columns, stats_csv._requests_data_rows),
        ("_failures.csv", stats_csv.failures_columns, stats_csv._failures_data_rows),
        ("_exceptions.csv", stats_csv.exceptions_columns, stats_csv._exceptions_data_rows),
    ):
        with open(prefix + suffix, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            rows(writer)


def server_rows(latency: dict[str, Any]) -> list[tuple[str, int, list[float]]]:
    """Per handler: its name, count and the _SHOWN microseconds (SERVER_COLUMNS once
    flattened); a handler whose entry is malformed is skipped."""
    rows = []
    for name, entry in sorted(latency.items()):
        try:
            rows.append((str(name), int(entry["count"]),
                         [float(entry[key]) for _, key, _ in _SHOWN]))
        except (KeyError, TypeError, ValueError):
            log.warning("--mux-admin: /stats's latency for %r is not understood; skipped", name)
    return rows


def side_by_side(environment: Environment, latency: dict[str, Any], admin: str) -> list[str]:
    """The table printed under Locust's: its entries and total, then the server's handlers."""
    head = "%-7s %-40s %8s" + " %9s" * len(_SHOWN)
    out = [f"Latency in ms: the client's (Locust) beside the server's (muxsrv /stats from "
           f"{admin}, to the microsecond)",
           head % ("Source", "Name", "# reqs", *(label for _, _, label in _SHOWN)),
           "-" * 7 + "|" + "-" * 40 + "|" + "-" * 8 + ("|" + "-" * 9) * len(_SHOWN)]
    stats = environment.stats
    for entry in [*(stats.entries[key] for key in sorted(stats.entries)), stats.total]:
        if not entry.num_requests:
            continue
        name = f"{entry.method} {entry.name}" if entry.method else entry.name
        cells = [entry.get_response_time_percentile(p) if p < 1 else entry.max_response_time
                 for p, _, _ in _SHOWN]
        out.append(head % ("Locust", name[:40], entry.num_requests,
                           *(f"{value:.0f}" for value in cells)))
    for name, count, values in server_rows(latency):
        out.append(head % ("muxsrv", name[:40], count, *(f"{v / 1000:.3f}" for v in values)))
    return [*out, ""]
