"""The race's PNG chart: full-speed deliveries/s and server CPU microseconds per delivery, per server and N.

Kept apart from ``bench.race`` so that the race's measuring code never imports matplotlib (it loads lazily
here, with the non-interactive Agg backend, only when a chart is drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    """One server's medians in the full-speed workload for one room size N."""

    server: str
    n: int
    deliveries_per_s: float
    user_us: float  # server CPU per delivery, user time
    sys_us: float  # server CPU per delivery, system time


def compact(value: float) -> str:
    """A rate for a label or a table cell: 2.70M, 135k, 9,500."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:,.0f}"


def draw(points: list[Point], path: Path, title: str) -> None:
    """Two panels of grouped bars (one bar per N, servers in the order of ``points``), saved as PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = list(dict.fromkeys(point.server for point in points))
    ns = sorted({point.n for point in points})
    by_key = {(point.server, point.n): point for point in points}
    width = 0.8 / len(ns)
    colours = plt.get_cmap("tab10").colors
    fig, (rate_ax, cpu_ax) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    for k, n in enumerate(ns):
        xs = [i + (k - (len(ns) - 1) / 2) * width for i in range(len(servers))]
        present = [(x, by_key[server, n]) for x, server in zip(xs, servers, strict=True) if (server, n) in by_key]
        if not present:
            continue
        px = [x for x, _ in present]
        rates = [point.deliveries_per_s for _, point in present]
        bars = rate_ax.bar(px, rates, width, color=colours[k % len(colours)], label=f"N={n}")
        rate_ax.bar_label(bars, [compact(rate) for rate in rates], fontsize=7, padding=2)
        users = [point.user_us for _, point in present]
        systems = [point.sys_us for _, point in present]
        cpu_ax.bar(px, users, width, color=colours[k % len(colours)], label=f"N={n} user")
        bars = cpu_ax.bar(px, systems, width, bottom=users, color=colours[k % len(colours)], alpha=0.45,
                          hatch="//", label=f"N={n} sys")
        cpu_ax.bar_label(bars, [f"{u + s:.2f}" for u, s in zip(users, systems, strict=True)], fontsize=7, padding=2)
    for ax, label in ((rate_ax, "deliveries/s (higher is better)"),
                      (cpu_ax, "server CPU µs per delivery, user + sys (lower is better)")):
        ax.set_xticks(range(len(servers)), servers, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8)
        ax.margins(y=0.12)
    rate_ax.yaxis.set_major_formatter(lambda value, _: compact(value) if value else "0")
    rate_ax.set_title("full speed: one room of N, one sender, window-paced")
    cpu_ax.set_title("server CPU per delivery (/proc/PID/stat over the window)")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
