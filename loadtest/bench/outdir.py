"""Where a benchmark or profile run writes: a fresh folder git ignores, unless asked.

The idea: results/ holds the committed figures the README quotes, so a run on
another machine, or a quick look, must never overwrite them by accident.  By
default every run gets a folder of its own, runs/<UTC time>/ (git-ignored), and
says where at the end; ``--write-results`` writes into results/ as a deliberate
act; ``--out DIR`` writes anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
from pathlib import Path

from servers import HERE, ROOT

RESULTS = HERE / "results"  # committed: rewritten only with --write-results
RUNS = HERE / "runs"  # one folder per run; in .gitignore
# As --help shows them: relative to the repository.
SHOWN = {"results": RESULTS.relative_to(ROOT), "runs": RUNS.relative_to(ROOT)}


def add_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--out DIR and --write-results, which exclude each other."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"where {what} go (default: a new folder under {SHOWN['runs']}/, "
        "which git ignores)",
    )
    group.add_argument(
        "--write-results",
        action="store_true",
        help=f"write {what} into {SHOWN['results']}/, replacing the committed ones",
    )


def choose(args: argparse.Namespace, now: datetime.datetime | None = None) -> Path:
    """The folder this run writes into, created: results/, --out, or a fresh one."""
    if args.write_results:
        out = RESULTS
    elif args.out is not None:
        out = args.out
    else:
        return fresh(RUNS, now)
    out.mkdir(parents=True, exist_ok=True)
    return out


def fresh(parent: Path, now: datetime.datetime | None = None) -> Path:
    """A new, empty folder under `parent`, named for the time; never one that exists."""
    stamp = f"{now or datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}"
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue  # two runs in the same second
        return path
    raise AssertionError("unreachable")
