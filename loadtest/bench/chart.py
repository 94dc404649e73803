"""The PNG: one horizontal bar chart per scenario, every server a bar, muxsrv in colour.

The idea: a reader should see at a glance where muxsrv sits between the
Python peers and the C limit, so each panel is sorted as the table is,
labels carry the value, the C server is grey and uvloop (the reference for
most targets) is outlined.  matplotlib is optional: without it, no chart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from report import C_SERVER, UVLOOP, Cell, fmt_value
from scenarios import Scenario

COLOURS = {"muxsrv": "#d62728", "muxsrv-upper": "#ff9896", C_SERVER: "#7f7f7f"}
OTHER = "#1f77b4"


def _short(x: float) -> str:
    """Axis ticks: 0, 40k, 1.5M."""
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    return f"{x / 1e3:g}k" if x else "0"


def panels(scs: Sequence[Scenario]) -> list[tuple[str, str, str, str]]:
    """(scenario key, field, title, unit) for each panel; p99 at 1k gets its own."""
    out = [(s.key, "value", s.title, s.unit) for s in scs]
    if any(s.key == "rr1k" for s in scs):
        out.append(("rr1k", "p99", "1,000 conns: p99 latency", "ms"))
    return out


def draw(path: Path, table: dict[str, dict[str, Cell]], servers: Sequence[str],
         scs: Sequence[Scenario], subtitle: str) -> bool:  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    specs = panels(scs)
    cols = min(4, len(specs))
    rows = (len(specs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 0.38 * len(servers) * rows + 1.6))
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (key, fld, title, unit) in zip(flat, specs, strict=False):
        names, values = [], []
        for name in servers:
            cell = table.get(name, {}).get(key)
            if cell is None:
                continue
            raw = cell.p99 if fld == "p99" else cell.value
            names.append(name + ("" if cell.ok else " (failed)"))
            values.append((raw or 0.0) / (1000.0 if fld == "p99" else 1.0) if cell.ok else 0.0)
        colours = [COLOURS.get(n, OTHER) for n in names]
        bars = ax.barh(range(len(names)), values, color=colours)
        for bar, name in zip(bars, names, strict=True):
            if name == UVLOOP:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        better = "lower is better" if fld == "p99" or unit == "B/conn" else "higher is better"
        ax.set_title(f"{title}\n{unit}, {better}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        top = max(values, default=0.0) or 1.0
        low = min((v for v in values if v > 0), default=top)
        log = better.startswith("lower") and top / low > 30
        if log:  # costs: one outlier would flatten every other bar
            ax.set_xscale("log")
            ax.set_xlim(low / 2, top * 8)
            ax.set_title(ax.get_title() + " (log scale)", fontsize=9)
        else:
            ax.set_xlim(0, top * 1.3)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            if unit == "req/s":
                ax.xaxis.set_major_formatter(lambda x, _pos: _short(x))
        for i, v in enumerate(values):
            label = f"{v:.2f}" if fld == "p99" else fmt_value(v, unit)
            x = v * 1.15 if log else v + top * 0.02
            ax.text(x, i, label if v else "—", va="center", fontsize=7)
    for ax in flat[len(specs) :]:
        ax.axis("off")
    fig.suptitle(f"muxsrv side-by-side benchmark — {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
