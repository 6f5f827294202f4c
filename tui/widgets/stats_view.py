"""Renderings of a `StatsSnapshot`: the numbers, and the layers x experts heat map."""
from __future__ import annotations

import math

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

from edgemoe.tui.stats import StatsSnapshot

# heat 0 -> 1: cold blue to hot red, readable on dark and light themes
HEAT_COLORS = ("#4c566a", "#5e81ac", "#88c0d0", "#a3be8c", "#ebcb8b", "#d08770", "#bf616a")
RESIDENT, ABSENT = "■", "·"
BAR_FULL, BAR_EMPTY = "█", "░"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def bar(fraction: float, width: int) -> Text:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    return Text.assemble((BAR_FULL * full, "bold"), (BAR_EMPTY * (width - full), "dim"))


def heat_style(heat: float) -> str:
    return HEAT_COLORS[min(int(heat * len(HEAT_COLORS)), len(HEAT_COLORS) - 1)]


def summary_lines(s: StatsSnapshot) -> list[Text]:
    """Label/value lines, each at most 30 cells wide (the sidebar)."""
    def line(label: str, *value) -> Text:
        return Text.assemble((f"{label:<9}", "dim"), *value)

    rate = f"{s.tokens_per_s:.1f} tok/s" if s.tokens > 1 else "–"
    lines = [line("speed", (rate, "bold"), f" ({s.tokens} tok)" if s.tokens else "")]
    if not s.has_cache:
        lines += [line("cache", "none: llama.cpp"), line("", "maps every expert"),
                  line("experts", fmt_bytes(s.expert_bytes_total))]
    else:
        share = s.budget_bytes / s.expert_bytes_total if s.expert_bytes_total else 0.0
        used = s.resident_bytes / s.budget_bytes if s.budget_bytes else 0.0
        prefetch = (f"{fmt_pct(s.prefetch_accuracy)} used ({s.prefetch_hits}/{s.prefetch_issued})"
                    if s.prefetch_issued else "none issued")
        lines += [
            line("hit", (fmt_pct(s.hit_rate), "bold"), f" now · {fmt_pct(s.session_hit_rate)} all"),
            line("read", "–" if s.bytes_per_token is None else f"{fmt_bytes(s.bytes_per_token)}/tok"),
            line("stall", "–" if s.stall_s_per_token is None else f"{1e3 * s.stall_s_per_token:.1f} ms/tok"),
            line("prefetch", prefetch),
            line("resident", f"{fmt_bytes(s.resident_bytes)} / {fmt_bytes(s.budget_bytes)}"),
            line("", bar(used, 14), f" {fmt_pct(used)}"),
            line("budget", f"{fmt_pct(share)} of {fmt_bytes(s.expert_bytes_total)}"),
        ]
    lines.append(line("peak RSS", fmt_bytes(s.peak_rss_bytes) if s.peak_rss_bytes else "–"))
    return lines


class StatsSummary(Static):
    def show(self, s: StatsSnapshot) -> None:
        self.update(Text("\n").join(summary_lines(s)))


class HeatMap(Widget):
    """One row per MoE layer: its hit rate, then a cell per expert (■ resident, · not), coloured
    by how often the expert was chosen lately. Experts are binned when the width is short."""

    DEFAULT_CSS = "HeatMap { height: auto; }"

    def __init__(self, wide: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.wide = wide  # the stats view: hit bar, resident bytes, 2-cell-wide experts
        self.snapshot = StatsSnapshot()

    def show(self, s: StatsSnapshot) -> None:
        resized = len(s.moe_layers) != len(self.snapshot.moe_layers)
        self.snapshot = s
        self.refresh(layout=resized)

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.snapshot.moe_layers) + 2

    def render(self) -> Text:
        s = self.snapshot
        if not s.moe_layers:
            return Text("no MoE layers", style="dim")
        label_w = len(f"L{max(s.moe_layers)}") + 1
        stats_w = (16 + 9) if self.wide and s.has_cache else 5 if s.has_cache else 0
        room = max(self.size.width - label_w - stats_w - 1, 1)
        cell_w = 2 if self.wide and 2 * s.n_experts <= room else 1
        per_cell = max(1, math.ceil(s.n_experts / (room // cell_w or 1)))
        out = Text()
        out.append(self._header(s, label_w, stats_w, per_cell) + "\n", style="dim")
        for row, layer in enumerate(s.moe_layers):
            out.append(f"L{layer}".ljust(label_w), style="dim")
            if s.has_cache:
                hit = s.layer_hit_rate[row] if row < len(s.layer_hit_rate) else None
                if self.wide:
                    out.append_text(bar(hit or 0.0, 10))
                    out.append(" ")
                out.append(f"{fmt_pct(hit):>4} ")
                if self.wide:
                    resident = sum(1 for (l, _e) in s.resident if l == layer)
                    out.append(f"{resident:>3}/{s.n_experts:<3}  ", style="dim")
            heat = s.heat[row] if row < len(s.heat) else ()
            for first in range(0, s.n_experts, per_cell):
                group = range(first, min(first + per_cell, s.n_experts))
                hot = max((heat[e] for e in group if e < len(heat)), default=0.0)
                present = sum((layer, e) in s.resident for e in group) * 2 >= len(group)
                glyph = RESIDENT if present or not s.has_cache else ABSENT
                out.append(glyph.ljust(cell_w), style=heat_style(hot))
            out.append("\n")
        out.append_text(self._legend(s))
        return out

    def _header(self, s: StatsSnapshot, label_w: int, stats_w: int, per_cell: int) -> str:
        hit = ("hit".ljust(16) + "resident " if self.wide else "hit") if s.has_cache else ""
        experts = "experts" if per_cell == 1 else f"experts ({per_cell}/cell)"
        return "".ljust(label_w) + hit.ljust(stats_w) + experts

    def _legend(self, s: StatsSnapshot) -> Text:
        legend = Text(style="dim")
        legend.append(f"{RESIDENT} resident {ABSENT} not  " if s.has_cache else "chosen: rarely ")
        for color in HEAT_COLORS:
            legend.append("■", style=color)
        legend.append(" hot" if s.has_cache else " often")
        return legend


class StatsPanel(VerticalScroll, can_focus=False):
    """The chat screen's sidebar: the numbers over the heat map (scrolls when layers are many)."""

    def compose(self):
        yield StatsSummary(id="summary")
        yield HeatMap(id="heatmap")

    def show(self, s: StatsSnapshot) -> None:
        self.query_one(StatsSummary).show(s)
        self.query_one(HeatMap).show(s)
        self.border_title = "stats · live" if s.generating else "stats"
