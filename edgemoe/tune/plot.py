"""Tokens/s and hit rate vs expert budget: a PNG (matplotlib) and a terminal rendering.

Lines are predictions (no prefetch: solid, prefetch: dashed), dots are measured runs; Belady's
hit rate is the offline bound; the shaded region lies over the memory cap.
"""
from __future__ import annotations

from pathlib import Path

from edgemoe.tune.sweep import TuneResult

MIB = 2**20
MARKERS = {"split": "S", "lru": "L", "lfu": "F", "hybrid": "H", "random": "R", "belady": "B"}


def _series(res: TuneResult, prefetch: bool, value) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in sorted(res.rows, key=lambda r: r.setting.budget_bytes):
        if r.setting.prefetch == prefetch:
            out.setdefault(r.setting.policy, []).append((r.setting.budget_bytes / MIB, value(r)))
    return out


def _cap_budget_mib(res: TuneResult) -> float | None:
    """The largest budget under the memory cap, where it cuts into the sweep."""
    if res.memory is None or res.memory.max_budget(res.cap_bytes) >= res.expert_bytes_total:
        return None
    return max(res.memory.max_budget(res.cap_bytes), 0) / MIB


def save_png(res: TuneResult, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    colors = {p: f"C{i}" for i, p in enumerate(MARKERS)}
    for prefetch, style in ((False, "-"), (True, "--")):
        for policy, pts in _series(res, prefetch, lambda r: r.predicted_tps).items():
            top.plot(*zip(*pts), style, color=colors[policy], label=f"{policy}{' +prefetch' if prefetch else ''}")
        for policy, pts in _series(res, prefetch, lambda r: 100 * r.sim.hit_rate).items():
            bottom.plot(*zip(*pts), style, color=colors[policy], alpha=0.5 if prefetch else 1.0,
                        label=None if prefetch else policy)
    bounds = sorted((r.setting.budget_bytes / MIB, 100 * r.sim.hit_rate) for r in res.bounds)
    if bounds:
        bottom.plot(*zip(*bounds), ":", color="black", label="belady (bound)")
    for r in res.measured_rows():
        x = r.setting.budget_bytes / MIB
        marker = "s" if r.setting.prefetch else "o"
        top.plot([x], [r.measured_tps], marker, color=colors[r.setting.policy], markeredgecolor="black")
        bottom.plot([x], [100 * r.measured_hit_rate], marker, color=colors[r.setting.policy], markeredgecolor="black")
    if res.recommended:
        r = res.recommended
        speed = r.measured_tps if r.runs else r.predicted_tps
        top.plot([r.setting.budget_bytes / MIB], [speed], "*", markersize=18, color="gold", markeredgecolor="black",
                 label="recommended")
    cap = _cap_budget_mib(res)
    if cap is not None:
        for ax in (top, bottom):
            ax.axvspan(cap, res.expert_bytes_total / MIB, color="grey", alpha=0.2, lw=0)
    top.set_ylabel("decode tokens/s (lines: predicted, dots: measured)")
    bottom.set_ylabel("expert hit rate % (dashed: +prefetch)")
    bottom.set_xlabel("expert budget (MiB); shaded: over the memory cap")
    top.set_title(f"edgemoe tune: {Path(res.options.model).name}")
    top.legend(fontsize=7, ncol=2)
    bottom.legend(fontsize=7, ncol=2)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def text_chart(series: dict[str, list[tuple[float, float]]], title: str, width: int = 64, height: int = 12,
               vline: float | None = None) -> str:
    """A character chart: one marker letter per series (MARKERS, '*' for measured points)."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return title + ": (no data)"
    x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
    y1 = max(y for _, y in pts) * 1.05 or 1.0
    grid = [[" "] * width for _ in range(height)]
    col = lambda x: round((x - x0) / ((x1 - x0) or 1) * (width - 1))  # noqa: E731
    row = lambda y: height - 1 - round(y / y1 * (height - 1))  # noqa: E731
    if vline is not None and x0 <= vline <= x1:
        for r in range(height):
            grid[r][col(vline)] = "|"
    for name, points in series.items():
        mark = MARKERS.get(name, "*")
        segments = zip(points, points[1:]) if name != "measured" else ()
        for (xa, ya), (xb, yb) in segments:  # dotted segments between points
            for i in range(1, 8):
                t = i / 8
                r, c = row(ya + t * (yb - ya)), col(xa + t * (xb - xa))
                if grid[r][c] in " |":
                    grid[r][c] = "·"
        for x, y in points:
            grid[row(y)][col(x)] = mark
    lines = [title]
    for i, cells in enumerate(grid):
        label = f"{y1 * (height - 1 - i) / (height - 1):8.1f}" if i in (0, height // 2, height - 1) else " " * 8
        lines.append(f"{label} ┤{''.join(cells)}")
    lines.append(" " * 9 + "└" + "─" * width)
    lines.append(" " * 10 + f"{x0:.1f}".ljust(width - 12) + f"{x1:.1f} MiB")
    legend = "  ".join(f"{MARKERS.get(n, '*')}={n}" for n in series)
    return "\n".join(lines + [" " * 10 + legend + ("  |=memory cap" if vline is not None else "")])


def terminal_plot(res: TuneResult, width: int = 64) -> str:
    speed = _series(res, False, lambda r: r.predicted_tps)
    measured = [(r.setting.budget_bytes / MIB, r.measured_tps) for r in res.measured_rows()]
    if measured:
        speed["measured"] = sorted(measured)
    hits = _series(res, False, lambda r: 100 * r.sim.hit_rate)
    hits["belady"] = sorted((r.setting.budget_bytes / MIB, 100 * r.sim.hit_rate) for r in res.bounds)
    cap = _cap_budget_mib(res)
    return "\n\n".join([text_chart(speed, "decode tokens/s vs expert budget (predicted, no prefetch; *=measured)",
                                   width, vline=cap),
                        text_chart(hits, "expert hit rate % vs expert budget (simulated)", width, vline=cap)])
