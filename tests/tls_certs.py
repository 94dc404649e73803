"""Throwaway certificates for the TLS tests, made with the ``openssl`` command.

A CA, a server certificate for 127.0.0.1 and localhost signed by it, a client
certificate signed by it, and a second CA nobody trusts (for refused mTLS).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    server_combined: Path  # certificate and key in one file
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the server does not know
    stranger_key: Path
    server2_cert: Path  # another server certificate from the same CA (reloads)
    server2_key: Path

    def client_context(self, version: ssl.TLSVersion | None = None,
                       with_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if version is not None:
            context.minimum_version = context.maximum_version = version
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def _leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext", cwd=directory)


def make_certs(directory: Path) -> Certs:
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl command")
    _ca(directory, "testca")
    _ca(directory, "strangerca")
    _leaf(directory, "server", "testca",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _leaf(directory, "server2", "testca",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _leaf(directory, "client", "testca", "extendedKeyUsage=clientAuth\n")
    _leaf(directory, "stranger", "strangerca", "extendedKeyUsage=clientAuth\n")
    combined = directory / "server-combined.pem"
    combined.write_bytes((directory / "server.pem").read_bytes()
                         + (directory / "server.key").read_bytes())
    return Certs(
        ca=directory / "testca.pem",
        server_cert=directory / "server.pem", server_key=directory / "server.key",
        server_combined=combined,
        client_cert=directory / "client.pem", client_key=directory / "client.key",
        stranger_cert=directory / "stranger.pem", stranger_key=directory / "stranger.key",
        server2_cert=directory / "server2.pem", server2_key=directory / "server2.key",
    )
