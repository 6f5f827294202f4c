"""One reply, generated in a worker thread: tokens batched (~50 ms), statistics throttled (~5 Hz).

No Textual here: the caller passes callbacks that post messages to the UI, so the loop is the
same in the app and in tests.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edgemoe.tui.prompt import Conversation, Sampling, build_prompt
from edgemoe.tui.stats import StatsSnapshot, StatsTracker

TEXT_BATCH_S = 0.05
STATS_EVERY_S = 0.2


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: int
    cancelled: bool = False
    error: str | None = None
    dropped_turns: int = 0  # oldest turns left out of the prompt to fit the context


def generate_reply(backend, conversation: Conversation, sampling: Sampling, tracker: StatsTracker,
                   on_text: Callable[[str], None], on_stats: Callable[[StatsSnapshot], None],
                   cancelled: Callable[[], bool]) -> Reply:
    """Stream one reply to the end of `conversation`. Never raises: an engine error ends the
    reply and comes back in `Reply.error` (the text so far is kept)."""
    parts: list[str] = []
    pending: list[str] = []
    tokens, stopped, error, dropped = 0, False, None, 0
    tracker.start_reply()
    last_text = last_stats = float("-inf")  # the first token and its stats show at once

    def flush() -> None:
        if pending:
            chunk = "".join(pending)
            pending.clear()
            parts.append(chunk)
            on_text(chunk)

    try:
        prompt = build_prompt(conversation, backend.vocab, backend.info.n_ctx - sampling.max_tokens)
        dropped = prompt.dropped_turns
        stream = backend.stream(prompt.ids, sampling)
        try:
            for event in stream:
                tracker.add(event)
                tokens += 1
                if event.text:
                    pending.append(event.text)
                now = time.monotonic()
                if now - last_text >= TEXT_BATCH_S:
                    flush()
                    last_text = now
                if now - last_stats >= STATS_EVERY_S:
                    on_stats(tracker.snapshot())
                    last_stats = now
                if cancelled():
                    stopped = True
                    break
        finally:
            stream.close()  # stops the engine between tokens
    except Exception as exc:  # shown in the chat; the app keeps running
        error = f"{type(exc).__name__}: {exc}"
    finally:
        flush()
        tracker.end_reply()
        on_stats(tracker.snapshot())
    return Reply("".join(parts), tokens, stopped, error, dropped)
