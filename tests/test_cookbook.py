"""The handler cookbook's recipes are real: extract every one, run its tests, type-check it.

Catches a recipe that drifts from the handler interface, one whose test no
longer passes, and one that stops passing ``mypy --strict`` against the
public API (a plugin author copies these).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, running_server

COOKBOOK = ROOT / "muxsrv" / "docs" / "cookbook.md"
TEXT = COOKBOOK.read_text(encoding="utf-8")

pytestmark = pytest.mark.timeout(300)


def recipes() -> dict[str, str]:
    """Code blocks whose first line is a comment naming a file: {"greeter.py": code}."""
    blocks: dict[str, str] = {}
    for code in re.findall(r"```python\n(.*?)```", TEXT, re.S):
        m = re.match(r"# (\w+\.py)\b", code)
        assert m, f"a python block in the cookbook does not name its file:\n{code[:200]}"
        assert m.group(1) not in blocks, f"two blocks named {m.group(1)}"
        blocks[m.group(1)] = code
    return blocks


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("cookbook")
    for name, code in recipes().items():
        (where / name).write_text(code)
    return where


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's muxsrv; the recipes come from the cwd
    return env


def test_every_handler_has_its_test() -> None:
    names = set(recipes())
    handlers = {n for n in names if not n.startswith(("test_", "locust_"))}
    assert {"greeter.py", "ticker.py", "numbered.py", "wordcount.py"} <= handlers
    assert {f"test_{n}" for n in handlers} <= names, "a recipe without a test"


def test_the_recipes_tests_pass(folder: Path) -> None:
    tests = sorted(p.name for p in folder.glob("test_*.py"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=folder, env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= len(tests), run.stdout


def test_the_recipes_pass_mypy_strict(folder: Path) -> None:
    handlers = sorted(p.name for p in folder.glob("*.py")
                      if not p.name.startswith(("test_", "locust_")))
    mypy = Path(sys.executable).with_name("mypy")
    run = subprocess.run(
        [str(mypy), "--strict", "--no-incremental", "--cache-dir", str(folder / ".mypy"),
         "--python-executable", sys.executable, *handlers],
        cwd=folder, env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_locustfile_runs_without_failures(folder: Path) -> None:
    """The load-testing recipe against its handler: requests made, every check passed."""
    env = {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
    with running_server("--handler", "numbered:Numbered", env=env) as srv:
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "locust_numbered.py", "--headless",
             "-u", "4", "-r", "4", "-t", "3s", "--host", f"tcp://{srv.host}:{srv.port}",
             "--csv", "numbered", "--only-summary"],
            cwd=folder, env=_env(), capture_output=True, text=True, timeout=60,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(folder / "numbered_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["N"]["Request Count"]) > 20 and rows["N"]["Failure Count"] == "0", rows
