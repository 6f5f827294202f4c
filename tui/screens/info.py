"""Model info and keyboard help: two read-only dialogs."""
from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from edgemoe.tui.backends import ModelInfo
from edgemoe.tui.widgets.stats_view import fmt_bytes

KEYS = (
    ("Enter", "send the message"),
    ("Esc", "stop the reply (between tokens); closes dialogs"),
    ("Ctrl+L", "clear the conversation"),
    ("Ctrl+Y", "copy the last reply to the clipboard"),
    ("F1", "this help"),
    ("F2", "statistics view (Esc back)"),
    ("F3", "settings: temperature, top-p, max tokens, budget, policy"),
    ("F4", "model info"),
    ("F5 / F6", "expert budget down / up by 1/8 of all experts (edgemoe backend)"),
    ("F7", "next cache policy: lru, lfu, hybrid, random"),
    ("Ctrl+Q", "quit"),
)


def info_table(info: ModelInfo) -> Table:
    s = info.summary
    table = Table(show_header=False, box=None, padding=(0, 1))
    table.add_column(style="dim")
    table.add_column()
    moe = [n for n in s.experts_per_layer if n]
    rows = [
        ("name", info.title), ("file", s.path), ("size", fmt_bytes(info.file_bytes)),
        ("architecture", s.arch), ("layers", f"{s.n_layers} ({len(moe)} MoE)"),
        ("experts", f"{max(moe, default=0)} per layer, {s.experts_used} per token"),
        ("expert bytes", fmt_bytes(s.expert_bytes)), ("dense bytes", fmt_bytes(s.dense_bytes)),
        ("types", ", ".join(f"{k}×{v}" for k, v in sorted(s.type_counts.items()))),
        ("prompting", "chat template (GGUF)" if info.chat_template else "plain continuation (no chat template)"),
        ("context", f"{info.n_ctx} tokens"), ("backend", info.backend),
        ("stock llama.cpp", f"{'yes' if s.stock_loadable else 'no'} ({s.stock_reason})"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table


def keys_table() -> Table:
    table = Table(show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold")
    table.add_column()
    for key, what in KEYS:
        table.add_row(key, what)
    return table


class InfoScreen(ModalScreen):
    BINDINGS = [Binding("escape,f4,q", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog") as box:
            box.border_title = "model · Esc closes"
            yield Static(info_table(self.app.backend.info))


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,f1,q", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog") as box:
            box.border_title = "keys · Esc closes"
            yield Static(keys_table())
            yield Static("The sidebar shows live expert-cache statistics; F2 shows them in full.",
                         classes="hint")
