"""Throwaway TLS and token files for the TLS and auth servers, made at run time.

The idea: nothing secret is checked in or left behind.  `BenchFiles` makes a
private temporary folder holding a self-signed certificate for 127.0.0.1 (an
EC P-256 key, so the 100 handshakes of a connect phase are cheap; the bulk
cipher, TLS 1.3's AES-256-GCM by default, is what the load scenarios
measure) and a token file, and removes it when closed.  The generator checks
the server's certificate against that same file (``--tls-ca``).  Server
commands name the files with placeholders (``{cert}``, ``{key}``,
``{tokens}``) that `expand` fills in.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

PLACEHOLDERS = ("{cert}", "{key}", "{tokens}")


def missing() -> str | None:
    """Why the files cannot be made here, or None."""
    if shutil.which("openssl") is None:
        return "the openssl command is not installed (it makes the throwaway certificate)"
    return None


class BenchFiles:
    """A temporary folder with cert.pem, key.pem and tokens; `close` removes it."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="muxsrv-bench-tls-"))  # mode 0700
        self.cert = self.folder / "cert.pem"
        self.key = self.folder / "key.pem"
        self.tokens = self.folder / "tokens"
        try:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec",
                 "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                 "-keyout", str(self.key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.tokens.write_text(f"# muxsrv bench, throwaway\n{secrets.token_hex(24)}\n")
            self.tokens.chmod(0o600)
        except BaseException:
            self.close()
            raise

    def expand(self, argv: tuple[str, ...]) -> list[str]:
        """`argv` with the placeholders replaced by this folder's files."""
        values = dict(zip(PLACEHOLDERS, map(str, (self.cert, self.key, self.tokens)), strict=True))
        return [values.get(a, a) for a in argv]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> BenchFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def needs_files(argv: tuple[str, ...]) -> bool:
    return any(a in PLACEHOLDERS for a in argv)
