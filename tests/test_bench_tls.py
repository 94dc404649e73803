"""The benchmark's TLS and AUTH scenarios: a tiny real run, and the pieces around it.

Catches: a generator that does not really speak TLS or send AUTH (the run
fails, or a wrong token goes unnoticed), certificate or token files left
behind after a run, a TLS server row missing from the report, and a bench
that breaks where OpenSSL's headers are missing instead of skipping the TLS
servers with a note (the plain generator, which has no TLS code, still builds).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

BENCH = ROOT / "loadtest" / "bench"
sys.path.insert(0, str(BENCH))

import cbuild  # noqa: E402  (after the path: the bench modules are not a package)
import report  # noqa: E402
import run as bench_run  # noqa: E402
import servers  # noqa: E402
import tlsfiles  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402

pytestmark = pytest.mark.timeout(120)

HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_tools = pytest.mark.skipif(
    shutil.which("openssl") is None or not HAVE_CC,
    reason="needs a C compiler and the openssl command",
)


@pytest.fixture(scope="module")
def loadgen_tls() -> Path:
    cbuild.build_all()
    if not servers.LOADGEN_TLS.exists():
        pytest.skip(cbuild.tls_missing or "loadgen-tls was not built")
    return servers.LOADGEN_TLS


@needs_tools
def test_a_tiny_tls_and_auth_run_verifies_every_reply_and_leaves_no_files(
    loadgen_tls: Path, tmp_path: Path
) -> None:
    names = ["muxsrv", "muxsrv-auth", "muxsrv-tls", "asyncio-protocol-tls"]
    if importlib.util.find_spec("uvloop") is not None:
        names.append("uvloop-protocol-tls")
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "out"
    argv = [sys.executable, str(BENCH / "run.py"), "--tls", "--servers", ",".join(names),
            "--repeats", "1", "--warmup", "0.1", "--duration", "0.2", "--quiet-wait", "0",
            "--retries", "0", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(temp)}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    runs = json.loads((out / "latest.json").read_text())["runs"]
    assert sorted(runs) == sorted(names)
    for name in names:
        assert sorted(runs[name]) == ["bulk", "pipe", "rr100"], name
        for key, results in runs[name].items():
            (r,) = results
            assert r["ok"] and r["completed"] > 0 and r["mismatches"] == 0, (name, key, r)
            if name.endswith("-tls"):
                assert r["tls"].startswith("TLSv1."), (name, r)  # spoken, not just asked for
            else:
                assert "tls" not in r
    report = (out / "latest.md").read_text()
    assert "## Ratio to uvloop Protocol over TLS (same run)" in report
    assert "| muxsrv-tls |" in report.split("over TLS (same run)")[1].split("##")[0]
    assert "## TLS and tokens: ratio to plaintext muxsrv (same run)" in report
    assert "TLS: muxsrv-tls, 100 conns req/s" in report
    assert "authenticated connections vs plain muxsrv" in report
    assert "## Server CPU per request (median of repeats; lower is cheaper)" in report
    assert list(temp.iterdir()) == []  # certificate, key and tokens removed


@needs_tools
def test_a_wrong_token_fails_every_connection(tmp_path: Path) -> None:
    cbuild.build_all()  # the plain generator: AUTH needs no TLS
    spec = next(s for s in servers.SERVERS if s.name == "muxsrv-auth")
    wrong = tmp_path / "wrong"
    wrong.write_text("# not the server's\n" + "x" * 32 + "\n")
    with tlsfiles.BenchFiles() as files:
        srv = servers.start(spec, None, files)
        try:
            def load(tokens: Path) -> tuple[int, dict[str, object]]:
                argv = [str(servers.BUILD / "loadgen"), "--port", str(srv.port), "--conns",
                        "4", "--warmup", "0.05", "--duration", "0.1", "--conn-timeout", "5",
                        "--auth-token-file", str(tokens)]  # fmt: skip
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                return done.returncode, json.loads(done.stdout.splitlines()[-1])

            status, right = load(files.tokens)
            assert status == 0 and right["established"] == 4 and right["completed"] > 0
            status, refused = load(wrong)
            assert status == 1 and refused["established"] == 0
            assert refused["error_frames"] == 4
        finally:
            srv.stop()
    assert srv.alive() is False


@needs_tools
def test_the_files_are_private_and_removed(tmp_path: Path) -> None:
    with tlsfiles.BenchFiles() as files:
        folder = files.folder
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(files.tokens.stat().st_mode) == 0o600
        token = [ln for ln in files.tokens.read_text().splitlines() if not ln.startswith("#")]
        assert len(token) == 1 and len(token[0]) >= 16
        argv = files.expand(servers.TLS_ARGS)
        assert argv == ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
        assert b"BEGIN CERTIFICATE" in files.cert.read_bytes()
    assert not folder.exists()


def test_a_server_with_placeholders_will_not_start_without_its_files() -> None:
    spec = next(s for s in servers.SERVERS if s.name == "muxsrv-tls")
    assert spec.needs_files and spec.tls
    with pytest.raises(RuntimeError, match="needs its TLS or token files"):
        servers.RunningServer(spec, None)


def test_without_openssl_the_tls_servers_are_skipped_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setattr(cbuild, "tls_missing", None)  # restored after the test
    monkeypatch.setattr(cbuild, "BUILD", tmp_path)
    monkeypatch.setattr(cbuild, "TLS_FLAGS", ("-DLOADGEN_TLS", "-include", "no/such/openssl.h"))
    assert cbuild.build_tls(force=True) is False
    assert cbuild.tls_missing is not None and "libssl-dev" in cbuild.tls_missing
    assert not (tmp_path / cbuild.TLS_NAME).exists()
    monkeypatch.setattr(servers, "LOADGEN_TLS", tmp_path / cbuild.TLS_NAME)
    bench = bench_run.Bench(bench_run.parse_args(["--tls", "--out", str(tmp_path / "out")]))
    skipped = [n for n in bench.notes if "loadgen-tls was not built" in n]
    assert {n.split(":")[0] for n in skipped} >= {"muxsrv-tls", "asyncio-protocol-tls"}
    assert "muxsrv-auth" in [s.name for s in bench.specs]  # needs no TLS: still runs
    assert "skip muxsrv-tls" in capsys.readouterr().out


def test_the_plain_generator_refuses_tls(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    plain = tmp_path / "loadgen"
    subprocess.run([cc, *cbuild.CFLAGS, "-o", str(plain), str(cbuild.SOURCES["loadgen"])],
                   check=True, timeout=120)  # fmt: skip
    done = subprocess.run([str(plain), "--port", "1", "--tls"], capture_output=True, text=True,
                          timeout=10)  # fmt: skip
    assert done.returncode == 2 and "built without OpenSSL" in done.stderr


def test_cpu_cost_is_server_time_per_request_or_per_megabyte() -> None:
    rr100, bulk = (next(s for s in SCENARIOS if s.key == k) for k in ("rr100", "bulk"))
    table = {
        "muxsrv-tls": {"rr100": report.Cell(value=50_000.0, server_cpu=1.0, runs=1),
                       "bulk": report.Cell(value=0.5, server_cpu=0.8, runs=1)},
        "uvloop-protocol-tls": {"rr100": report.Cell(value=40_000.0, server_cpu=0.5, runs=2,
                                                     failed=1)},
    }  # fmt: skip
    assert report.cpu_cost(table["muxsrv-tls"]["rr100"], rr100.unit) == pytest.approx(20.0)
    assert report.cpu_cost(table["muxsrv-tls"]["bulk"], bulk.unit) == pytest.approx(1600.0)
    lines = report.cost_table(table, ["muxsrv-tls", "uvloop-protocol-tls"], [rr100, bulk])
    assert lines[0] == "| server | 100 conns (us/req) | 8 x 1 MiB (us/MB) |"
    assert lines[2] == "| muxsrv-tls | 20.00 | 1,600 |"
    assert lines[3] == "| uvloop-protocol-tls |  |  |"  # a failed run is no figure
