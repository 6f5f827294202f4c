"""The chat app and the factory that builds it (the CLI and the tests both use `create_app`)."""
from __future__ import annotations

from pathlib import Path

from textual.app import App

from edgemoe.tui.backends import LIVE_POLICIES
from edgemoe.tui.prompt import Conversation, Sampling
from edgemoe.tui.screens import ChatScreen, HelpScreen, InfoScreen, SettingsChange, SettingsScreen, StatsScreen
from edgemoe.tui.stats import StatsSnapshot, StatsTracker
from edgemoe.tui.widgets.stats_view import fmt_bytes, fmt_pct

BUDGET_STEPS = 8  # F5/F6 move the budget by 1/8 of all expert bytes


class ChatApp(App):
    CSS_PATH = Path(__file__).with_name("edgemoe.tcss")
    TITLE = "edgemoe chat"
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, backend, sampling: Sampling = Sampling()):
        super().__init__()
        self.backend, self.sampling = backend, sampling
        self.conversation = Conversation()
        info = backend.info
        self.tracker = StatsTracker(backend.name, backend.controls_cache, info.moe_layers, info.n_experts,
                                    backend.expert_bytes_total)
        self.tracker.set_residency(backend.residency())
        self.stats: StatsSnapshot = self.tracker.snapshot()
        self.sub_title = f"{info.title} · {backend.name} backend"
        self.chat = ChatScreen()
        self.reloading = False  # a budget change's model reload is running in a worker thread

    def get_default_screen(self) -> ChatScreen:
        return self.chat

    def mode_note(self) -> str:
        info = self.backend.info
        if info.chat_template:
            return f"{info.title}: the GGUF's chat template formats the conversation."
        return (f"{info.title} has no chat template: plain continuation. The model continues your text; "
                "each message adds a line to one running document.")

    def settings_line(self, budget: bool = False) -> str:
        """Sampling and cache settings in a line (`budget`: name it too; the sidebar shows it)."""
        s, b = self.sampling, self.backend
        line = f"T {s.temperature:g} · top-p {s.top_p:g} · max {s.max_tokens}"
        if not b.controls_cache:
            return f"{line} · llama.cpp"
        line += f" · {b.policy} · prefetch {'on' if b.prefetch else 'off'}"
        return f"budget {fmt_bytes(self.stats.budget_bytes)} · {line}" if budget else line

    def show_stats(self, snapshot: StatsSnapshot) -> None:
        """Hand a snapshot to every screen on the stack that shows statistics."""
        self.stats = snapshot
        if self.chat.is_mounted:
            self.chat.refresh_status()  # the budget it names may have changed
        for screen in self.screen_stack:
            show = getattr(screen, "show_stats", None)
            if show is not None:
                show(snapshot)

    def refresh_settings(self) -> None:
        self.show_stats(self.tracker.snapshot())

    # ---- cache control (edgemoe backend) ------------------------------------------------------
    def set_budget(self, budget_bytes: int) -> bool:
        """Change the expert budget; False where it was refused. A change that reloads the model
        (budgeted llama.cpp leaving its default layout: seconds) runs in a worker thread, so the UI
        stays live; a prompt sent meanwhile waits for the load (True: the reload started)."""
        if self.reloading:
            self.notify("The model is still reloading for the last budget change; try again when it is done.",
                        title="budget unchanged", severity="warning")
            return False
        if not self.backend.budget_reloads(budget_bytes):
            return self._budget_set(budget_bytes, *self._change_budget(budget_bytes))
        self.reloading = True
        self.notify(f"Reloading the model for an expert budget of {fmt_bytes(budget_bytes)} "
                    "(llama.cpp's repacked load cannot give experts back); a prompt sent now waits for it.")

        def reload() -> None:
            try:
                result = self._change_budget(budget_bytes)
            except Exception as exc:  # noqa: BLE001 (a load that failed otherwise: say so, never kill the app)
                result = None, exc
            self.call_from_thread(self._budget_set, budget_bytes, *result)
        self.run_worker(reload, thread=True, group="budget", name="budget reload")
        return True

    def _change_budget(self, budget_bytes: int):
        """(residency, None) or (None, the error that refused it)."""
        try:
            return self.backend.set_budget(budget_bytes), None
        except ValueError as exc:  # BudgetError included
            return None, exc

    def _budget_set(self, budget_bytes: int, residency, error: Exception | None) -> bool:
        self.reloading = False
        if error is not None:  # say why; the old budget stands
            self.notify(str(error), title="budget unchanged", severity="error")
            return False
        self.tracker.set_residency(residency)
        self.refresh_settings()
        share = budget_bytes / self.backend.expert_bytes_total if self.backend.expert_bytes_total else 0
        self.notify(f"Expert budget {fmt_bytes(budget_bytes)} ({fmt_pct(share)} of all experts).")
        return True

    def set_policy(self, name: str) -> bool:
        try:
            self.backend.set_policy(name)
        except ValueError as exc:
            self.notify(str(exc), title="policy unchanged", severity="error")
            return False
        self.refresh_settings()
        self.notify(f"Cache policy {name}.")
        return True

    def action_budget(self, direction: int) -> None:
        if not self.backend.controls_cache:
            self.notify("The llama backend has no expert budget.", severity="warning")
            return
        total = self.backend.expert_bytes_total
        step = total // BUDGET_STEPS
        current = self.stats.budget_bytes
        steps = round(current / step) + direction if step else 0
        self.set_budget(max(min(steps, BUDGET_STEPS), 1) * step)

    def action_next_policy(self) -> None:
        if not self.backend.controls_cache:
            self.notify("The llama backend has no cache policy.", severity="warning")
            return
        current = self.backend.policy
        i = LIVE_POLICIES.index(current) if current in LIVE_POLICIES else -1
        self.set_policy(LIVE_POLICIES[(i + 1) % len(LIVE_POLICIES)])

    # ---- views --------------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_info(self) -> None:
        if not isinstance(self.screen, InfoScreen):
            self.push_screen(InfoScreen())

    def action_stats(self) -> None:
        if not isinstance(self.screen, StatsScreen):
            self.push_screen(StatsScreen())

    def action_settings(self) -> None:
        if not isinstance(self.screen, SettingsScreen):
            self.push_screen(SettingsScreen(), self.apply_settings)

    def apply_settings(self, change: SettingsChange | None) -> None:
        if change is None:
            return
        self.sampling = change.sampling
        if change.budget_bytes is not None:
            self.set_budget(change.budget_bytes)
        if change.policy is not None:
            self.set_policy(change.policy)
        self.refresh_settings()

    def on_unmount(self) -> None:
        self.chat.cancel_event.set()  # the worker stops at the next token; backend.close() waits for it


def create_app(backend, sampling: Sampling = Sampling()) -> ChatApp:
    """The chat app on `backend` (tui.backends.EngineChat or LlamaChat, or anything shaped like them)."""
    return ChatApp(backend, sampling)


def run_chat(backend, sampling: Sampling = Sampling()) -> None:
    """Run the app in this terminal until the user quits, then close the backend (waiting for a
    token in flight: never free the cache under a running forward pass)."""
    try:
        create_app(backend, sampling).run()
    finally:
        backend.close()
