"""Settings dialog: sampling for the next replies, budget and policy of the cache at once."""
from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from edgemoe.memory import parse_budget
from edgemoe.tui.backends import LIVE_POLICIES
from edgemoe.tui.prompt import Sampling, read_sampling
from edgemoe.tui.widgets.stats_view import fmt_bytes


@dataclass(frozen=True)
class SettingsChange:
    sampling: Sampling
    budget_bytes: int | None = None  # None: unchanged
    policy: str | None = None


class SettingsScreen(ModalScreen[SettingsChange | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        app = self.app
        s, backend = app.sampling, app.backend
        stats = app.stats
        self.budget_text = fmt_bytes(stats.budget_bytes) if backend.controls_cache else "all experts (mmap)"
        with Vertical(classes="dialog", id="settings") as box:
            box.border_title = "settings · Enter applies · Esc cancels"
            with Grid(id="settings-grid"):
                yield Label("temperature")
                yield Input(str(s.temperature), id="temperature", compact=True)
                yield Label("top-p")
                yield Input(str(s.top_p), id="top-p", compact=True)
                yield Label("max tokens")
                yield Input(str(s.max_tokens), id="max-tokens", compact=True)
                yield Label("expert budget")
                yield Input(self.budget_text, id="budget", disabled=not backend.controls_cache,
                            placeholder="50%, 8MiB, 2GB", compact=True)
                yield Label("cache policy")
                yield Select([(p, p) for p in LIVE_POLICIES], value=backend.policy if backend.policy in
                             LIVE_POLICIES else Select.NULL, allow_blank=backend.policy not in LIVE_POLICIES,
                             id="policy", disabled=not backend.controls_cache, compact=True)
            note = (f"all experts: {fmt_bytes(backend.expert_bytes_total)}; budget and policy apply at once"
                    if backend.controls_cache else "the llama backend has no expert cache to change")
            yield Static(note, classes="hint")
            yield Static("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Apply", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#temperature", Input).focus()

    def value(self, selector: str) -> str:
        return self.query_one(selector, Input).value.strip()

    @on(Button.Pressed, "#apply")
    @on(Input.Submitted)
    def apply(self) -> None:
        app = self.app
        try:
            sampling = read_sampling(self.value("#temperature"), self.value("#top-p"), self.value("#max-tokens"),
                                     app.backend.info.n_ctx)
            budget = policy = None
            if app.backend.controls_cache:
                if self.value("#budget") != self.budget_text:
                    budget = parse_budget(self.value("#budget"), app.backend.expert_bytes_total)
                chosen = self.query_one("#policy", Select).value
                if chosen != Select.NULL and chosen != app.backend.policy:
                    policy = str(chosen)
        except ValueError as exc:
            self.query_one("#settings-error", Static).update(str(exc))
            return
        self.dismiss(SettingsChange(sampling, budget, policy))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
