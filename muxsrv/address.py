"""Addresses as log lines show them: ``host:port``, ``[v6host]:port``."""

from __future__ import annotations

from typing import Any

__all__ = ["format_address"]


def format_address(address: Any) -> str:
    """``host:port``, ``[v6host]:port``, or ``unknown peer``."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unknown peer" if address is None else str(address)
