"""The main screen: the conversation, the prompt, the live statistics sidebar."""
from __future__ import annotations

import threading

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from edgemoe.tui.generation import Reply, generate_reply
from edgemoe.tui.prompt import Conversation
from edgemoe.tui.screens.stats import cache_bindings
from edgemoe.tui.stats import StatsSnapshot
from edgemoe.tui.widgets import ChatLog, MessageView, StatsPanel


class ChatScreen(Screen):
    BINDINGS = [
        Binding("f1", "app.help", "Help"),
        Binding("escape", "stop", "Stop"),
        Binding("f2", "app.stats", "Stats"),
        Binding("f3", "app.settings", "Settings"),
        Binding("f4", "app.info", "Model"),
        Binding("ctrl+l", "clear", "Clear"),
        Binding("ctrl+y", "copy", "Copy"),
        *cache_bindings(show=False),  # the footer has no room for them at 80 columns; F1 lists them
    ]

    class TextArrived(Message):
        def __init__(self, generation: int, text: str) -> None:
            super().__init__()
            self.generation, self.text = generation, text

    class StatsArrived(Message):
        def __init__(self, snapshot: StatsSnapshot) -> None:
            super().__init__()
            self.snapshot = snapshot

    class ReplyDone(Message):
        def __init__(self, generation: int, reply: Reply) -> None:
            super().__init__()
            self.generation, self.reply = generation, reply

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0               # bumped by clear: late messages of an old reply are dropped
        self.generating = False
        self.cancel_event = threading.Event()
        self.reply_view: MessageView | None = None

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="main"):
            with Vertical(id="chat-pane"):
                yield ChatLog(id="chat-log")
                yield Input(placeholder="Message · Enter sends · F1 help", id="prompt")
            yield StatsPanel(id="stats-panel")
        yield Static(id="status-line")
        yield Footer()

    def on_mount(self) -> None:
        self.show_stats(self.app.stats)
        self.refresh_status()
        self.query_one(ChatLog).add_message("note", self.app.mode_note())
        for warning in self.app.backend.warnings:
            self.query_one(ChatLog).add_message("note", f"warning: {warning}")
        self.query_one("#prompt", Input).focus()

    @property
    def log_view(self) -> ChatLog:
        return self.query_one(ChatLog)

    def show_stats(self, snapshot: StatsSnapshot) -> None:
        self.query_one(StatsPanel).show(snapshot)

    def refresh_status(self) -> None:
        if not self.query("#status-line"):
            return  # not composed yet: on_mount draws it
        state = "● generating" if self.generating else "ready"
        self.query_one("#status-line", Static).update(f"{state} · {self.app.settings_line()}")

    # ---- sending and streaming ------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.generating:
            self.notify("A reply is still streaming: Esc stops it.", severity="warning")
            return
        event.input.value = ""
        conversation: Conversation = self.app.conversation
        conversation.add("user", text)
        self.log_view.add_message("user", text)
        self.reply_view = self.log_view.add_message("assistant")
        self.generating = True
        self.cancel_event.clear()
        self.refresh_status()
        self.run_reply(Conversation(list(conversation.turns)), self.generation)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def run_reply(self, conversation: Conversation, generation: int) -> None:
        app = self.app
        reply = generate_reply(app.backend, conversation, app.sampling, app.tracker,
                               on_text=lambda text: self.post_message(self.TextArrived(generation, text)),
                               on_stats=lambda snap: self.post_message(self.StatsArrived(snap)),
                               cancelled=self.cancel_event.is_set)
        self.post_message(self.ReplyDone(generation, reply))

    def on_chat_screen_text_arrived(self, message: TextArrived) -> None:
        if message.generation == self.generation and self.reply_view is not None:
            self.log_view.append(self.reply_view, message.text)

    def on_chat_screen_stats_arrived(self, message: StatsArrived) -> None:
        self.app.show_stats(message.snapshot)

    def on_chat_screen_reply_done(self, message: ReplyDone) -> None:
        self.generating = False
        self.refresh_status()
        reply = message.reply
        if message.generation != self.generation:
            return
        view, self.reply_view = self.reply_view, None
        if reply.text:
            self.app.conversation.add("assistant", reply.text)
        if view is not None:
            status = f"{reply.tokens} tokens" + (" · stopped" if reply.cancelled else "")
            if reply.dropped_turns:
                status += f" · {reply.dropped_turns} oldest turns left out to fit the context"
            view.set_status(status)
            if not reply.text:
                view.remove()
        if reply.error:
            self.log_view.add_message("error", reply.error)

    # ---- actions ------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.generating:
            self.cancel_event.set()

    def action_clear(self) -> None:
        self.cancel_event.set()
        self.generation += 1
        self.reply_view = None
        self.app.conversation.clear()
        self.log_view.clear_messages()
        self.log_view.add_message("note", "Conversation cleared.")

    def action_copy(self) -> None:
        replies = [t.content for t in self.app.conversation.turns if t.role == "assistant"]
        if self.reply_view is not None and self.reply_view.text:
            replies.append(self.reply_view.text)
        if not replies:
            self.notify("No reply to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(replies[-1])
        self.notify(f"Copied the last reply ({len(replies[-1])} characters).")
