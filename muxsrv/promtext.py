"""The Prometheus text exposition format (0.0.4) of a /stats snapshot: plain data in, text out.

Names are prefixed ``muxsrv_``; counters end ``_total``; the latency is a
histogram in seconds over ``stats.COARSE_BUCKETS`` (cumulative ``_bucket``
series with ``le`` up to ``+Inf``, then ``_sum`` and ``_count``).  With
``--workers`` every series carries a ``worker`` label, one per worker
(``render_workers``); a dead worker's last counters stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from .stats import Histogram

__all__ = ["CONTENT_TYPE", "render", "render_workers"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, how to find the value(s) in a snapshot (a path; a dict: by label).
_SERIES: Final[tuple[tuple[str, str, str, tuple[str, ...], str], ...]] = (
    ("connections_accepted_total", "counter", "Connections accepted (not refused).",
     ("connections", "accepted"), ""),
    ("connections_refused_total", "counter", "Connections turned away, by reason.",
     ("connections", "refused"), "reason"),
    ("connections_closed_total", "counter", "Connections closed, by reason.",
     ("connections", "closed"), "reason"),
    ("connections", "gauge", "Connections open now (admin ones not counted).",
     ("connections", "current"), ""),
    ("connections_peak", "gauge", "The most connections open at once.",
     ("connections", "peak"), ""),
    ("messages_received_total", "counter", "Messages received.", ("messages", "in"), ""),
    ("messages_sent_total", "counter", "Replies and error frames queued.",
     ("messages", "out"), ""),
    ("received_bytes_total", "counter", "Bytes read (wire bytes, framing included).",
     ("bytes", "in"), ""),
    ("sent_bytes_total", "counter", "Bytes the kernel took (wire bytes, framing included).",
     ("bytes", "out"), ""),
    ("handler_errors_total", "counter", "Handler calls that raised.", ("handler_errors",), ""),
    ("flow_control_pauses_total", "counter", "Times a connection's output passed the "
     "high-water mark.", ("flow_control_pauses",), ""),
    ("pending_output_bytes", "gauge", "Output queued, not yet taken by the kernel.",
     ("pending_output_bytes",), ""),
    ("buffered_input_bytes", "gauge", "Bytes held of unfinished messages.",
     ("buffered_input_bytes",), ""),
    ("emfile_episodes_total", "counter", "Times accepting paused for lack of descriptors.",
     ("emfile_episodes",), ""),
    ("exec_started_total", "counter", "Commands started.", ("exec", "started"), ""),
    ("exec_finished_total", "counter", "Commands finished, by outcome.",
     ("exec", "finished"), "outcome"),
    ("exec_running", "gauge", "Commands running.", ("exec", "running"), ""),
    ("exec_queued", "gauge", "Commands waiting for a slot.", ("exec", "queued"), ""),
    ("admin_connections_accepted_total", "counter", "Admin connections accepted.",
     ("admin", "accepted"), ""),
    ("admin_connections", "gauge", "Admin connections open.", ("admin", "current"), ""),
    ("uptime_seconds", "gauge", "Seconds since the server started.", ("uptime_seconds",), ""),
)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    items = [f'{name}="{_escape(value)}"' for name, value in pairs]
    return "{" + ",".join(items) + "}" if items else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _lookup(snap: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = snap
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def render_workers(parts: list[tuple[str | None, dict[str, Any], dict[str, Histogram]]]) -> str:
    """Every series for each (worker label or None, snapshot, histograms by handler)."""
    lines: list[str] = []
    for name, kind, text, path, label in _SERIES:
        full = f"muxsrv_{name}"
        lines.append(f"# HELP {full} {text}")
        lines.append(f"# TYPE {full} {kind}")
        for worker, snap, _hists in parts:
            base = [("worker", worker)] if worker is not None else []
            value = _lookup(snap, path)
            if isinstance(value, dict):
                for key in sorted(value):
                    lines.append(f"{full}{_labels([*base, (label, key)])} {_number(value[key])}")
            elif isinstance(value, (int, float)):
                lines.append(f"{full}{_labels(base)} {_number(value)}")
    full = "muxsrv_latency_seconds"
    lines.append(f"# HELP {full} From the read that completed a message to its reply "
                 "handed to the kernel in full, per handler.")
    lines.append(f"# TYPE {full} histogram")
    for worker, _snap, hists in parts:
        base = [("worker", worker)] if worker is not None else []
        for handler in sorted(hists):
            hist = hists[handler]
            labels = [*base, ("handler", handler)]
            for le, count in hist.coarse():
                lines.append(f"{full}_bucket{_labels([*labels, ('le', repr(le))])} {count}")
            lines.append(f"{full}_bucket{_labels([*labels, ('le', '+Inf')])} {hist.count}")
            lines.append(f"{full}_sum{_labels(labels)} {hist.sum_us / 1e6!r}")
            lines.append(f"{full}_count{_labels(labels)} {hist.count}")
    info = parts[0][1] if parts else {}
    lines.append("# HELP muxsrv_info The version and the options in force.")
    lines.append("# TYPE muxsrv_info gauge")
    options = info.get("options", {})
    pairs = [("version", str(info.get("version", "")))] + [
        (key, str(options[key])) for key in sorted(options)
        if key.replace("_", "").isalnum() and key not in ("version", "worker")]
    lines.append(f"muxsrv_info{_labels(pairs)} 1")
    return "\n".join(lines) + "\n"


def render(snap: dict[str, Any], hists: dict[str, Histogram]) -> str:
    """One server's metrics."""
    return render_workers([(None, snap, hists)])
