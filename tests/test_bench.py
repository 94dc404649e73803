"""The benchmark leaves the committed results alone unless asked, and says what it wrote.

No benchmark runs here: the pieces are tested on their own.  Where the output
goes (outdir.choose, from run.py's own argument parser), and what `Bench.write`
leaves and reports for a run whose figures are made up, with and without
matplotlib.  The bench modules import each other by bare name, as the scripts
do when run from their folder.
"""

from __future__ import annotations

import datetime
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT

BENCH = ROOT / "loadtest" / "bench"
sys.path.insert(0, str(BENCH))

import outdir  # noqa: E402  (after the path: the bench modules are not a package)
import run as bench_run  # noqa: E402

NOW = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


# ------------------------------------------------------------ where it writes


def test_by_default_each_run_gets_a_fresh_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outdir, "RUNS", tmp_path / "runs")
    args = bench_run.parse_args([])
    first = outdir.choose(args, NOW)
    second = outdir.choose(args, NOW)  # the same second: still a folder of its own
    assert first == tmp_path / "runs" / "20300102T030405Z"
    assert second.parent == first.parent and second != first
    assert first.is_dir() and second.is_dir() and not any(second.iterdir())


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_default_folder_is_ignored_by_git_and_results_are_not() -> None:
    inside = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True
    )
    if inside.stdout.strip() != "true":
        pytest.skip("not a git work tree")

    def ignored(path: Path) -> bool:
        check = ["git", "check-ignore", "-q", "--no-index", str(path.relative_to(ROOT))]
        return subprocess.run(check, cwd=ROOT).returncode == 0

    assert ignored(outdir.RUNS / "20300102T030405Z" / "latest.md")
    assert not ignored(outdir.RESULTS / "latest.md")


def test_write_results_means_the_committed_folder_and_out_any_folder(tmp_path: Path) -> None:
    assert outdir.choose(bench_run.parse_args(["--write-results"])) == outdir.RESULTS
    mine = tmp_path / "a" / "b"
    assert outdir.choose(bench_run.parse_args(["--out", str(mine)])) == mine
    assert mine.is_dir()


def test_out_and_write_results_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_run.parse_args(["--write-results", "--out", "x"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_names_both_ways() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--write-results" in proc.stdout and "--out DIR" in proc.stdout


# ------------------------------------------------------- what it writes and says


def made_up_bench(out: Path) -> bench_run.Bench:
    """A Bench with one finished run of muxsrv on lat1, writing into `out`."""
    bench = bench_run.Bench(
        bench_run.parse_args(["--servers", "muxsrv", "--scenarios", "lat1", "--out", str(out)])
    )
    result = {
        "ok": True, "value": 40_000.0, "p50_us": 24.0, "p99_us": 40.0, "server_cpu": 1.0,
        "gen_cpu": 0.9, "spare": 0.1, "background": 0.01, "attempts": 1,
    }  # fmt: skip
    bench.runs = {"muxsrv": {"lat1": [result]}}
    return bench


def without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails


def test_without_matplotlib_it_says_no_chart_and_names_no_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_matplotlib(monkeypatch)
    written = made_up_bench(tmp_path).write(time.monotonic(), [])
    said = "\n".join(written.where())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "latest.md"]
    assert "no chart drawn (matplotlib is not installed)" in said
    assert "no chart drawn (matplotlib is not installed)" in written.text  # the report's notes
    assert ".png" not in said and ".png" not in written.text
    assert said.startswith(f"wrote latest.md, latest.json in {tmp_path}")


def test_without_matplotlib_an_old_chart_beside_new_tables_is_pointed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_matplotlib(monkeypatch)
    (tmp_path / "latest.png").write_bytes(b"an earlier run's chart")
    written = made_up_bench(tmp_path).write(time.monotonic(), [])
    assert "latest.png" not in written.files
    assert written.no_chart == (
        "no chart drawn (matplotlib is not installed); the latest.png there is from an "
        "earlier run"
    )
    assert (tmp_path / "latest.png").read_bytes() == b"an earlier run's chart"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_with_matplotlib_the_chart_is_drawn_and_named(tmp_path: Path) -> None:
    written = made_up_bench(tmp_path).write(time.monotonic(), [])
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")
    assert written.no_chart is None
    assert written.where() == [f"wrote latest.md, latest.json, latest.png in {tmp_path}"]
