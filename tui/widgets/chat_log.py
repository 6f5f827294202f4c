"""The conversation as it appears: one block per turn, the model's block growing as text streams."""
from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static

ROLE_LABELS = {"user": "you", "assistant": "model", "error": "error", "note": "note"}
PART_CHARS = 400  # a streaming block is cut into parts at line ends: each batch re-wraps only the last


class MessageView(Vertical):
    """One turn. Model text is shown verbatim (never parsed as markup: it may hold brackets).

    Appending re-renders only the last part, so a long reply costs the same per batch as a short
    one (re-wrapping the whole text every 50 ms grows quadratically)."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role, self.text = role, ""
        self.border_title = ROLE_LABELS.get(role, role)
        self._tail = ""
        self._part = Static(Text("…"))
        self._initial = text

    def compose(self):
        yield self._part

    def on_mount(self) -> None:
        if self._initial:
            self.append(self._initial)

    def append(self, text: str) -> None:
        self.text += text
        self._tail += text
        if len(self._tail) > PART_CHARS and "\n" in self._tail[:-1]:
            cut = self._tail.rindex("\n", 0, len(self._tail) - 1)
            done, self._tail = self._tail[:cut], self._tail[cut + 1:]  # the newline becomes the part break
            self._part.update(Text(done))
            self._part = Static()
            self.mount(self._part)
        self._part.update(Text(self._tail or ("" if self.text else "…")))

    def set_status(self, status: str) -> None:
        """A short note under the text's border (tokens, stopped, ...)."""
        self.border_subtitle = status


class ChatLog(VerticalScroll):
    """Scrolls to the newest text while the reader is at the bottom; stays put if they scrolled up."""

    can_focus = False

    def add_message(self, role: str, text: str = "") -> MessageView:
        view = MessageView(role, text)
        self.mount(view)
        self.call_after_refresh(self.scroll_end, animate=False)
        return view

    def append(self, view: MessageView, text: str) -> None:
        follow = self.is_vertical_scroll_end
        view.append(text)
        if follow:
            self.call_after_refresh(self.scroll_end, animate=False)

    def clear_messages(self) -> None:
        self.remove_children()

    @property
    def messages(self) -> list[MessageView]:
        return list(self.query(MessageView))
