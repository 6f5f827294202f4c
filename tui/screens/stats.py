"""The full statistics view: every number, and the heat map with per-layer hit bars."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from edgemoe.tui.stats import WINDOW_STEPS, StatsSnapshot
from edgemoe.tui.widgets import HeatMap, StatsSummary

EXPLAIN = (f"hit: accesses served from the cache, now = last {WINDOW_STEPS} tokens (per layer, estimated: "
           "chosen experts resident when the token began). read: expert bytes loaded per decoded token.")


def cache_bindings(show: bool) -> list[Binding]:
    """F5/F6/F7: budget and policy, from the chat and from this view."""
    return [Binding("f5", "app.budget(-1)", "Budget -", show=show),
            Binding("f6", "app.budget(1)", "Budget +", show=show),
            Binding("f7", "app.next_policy", "Policy", show=show)]


class StatsScreen(Screen):
    BINDINGS = [
        Binding("escape,f2", "app.pop_screen", "Back"),
        Binding("f3", "app.settings", "Settings"),
        *cache_bindings(show=True),
        Binding("f1", "app.help", "Help", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with VerticalScroll(id="stats-body"):
            yield StatsSummary(id="stats-numbers")
            yield HeatMap(wide=True, id="stats-heatmap")
            yield Static(EXPLAIN, id="stats-explain")
        yield Footer()

    def on_mount(self) -> None:
        self.show_stats(self.app.stats)

    def show_stats(self, snapshot: StatsSnapshot) -> None:
        self.query_one(StatsSummary).show(snapshot)
        self.query_one(HeatMap).show(snapshot)
        self.query_one("#stats-body").border_title = f"statistics · {self.app.settings_line(budget=True)}"
