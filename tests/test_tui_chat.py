"""Pilot tests of `edgemoe chat` driving the real engine on the demo model (80x24 terminal)."""
from __future__ import annotations

import pytest
from test_tui_fakes import record_notifications, send, wait_reply, wait_until

from edgemoe.demo import demo_gguf
from edgemoe.engine import Engine, EngineConfig
from edgemoe.tui import Sampling, create_app, open_backend
from edgemoe.tui.prompt import plain_text
from edgemoe.tui.widgets import ChatLog

pytestmark = pytest.mark.asyncio
SIZE = (80, 24)
PROMPT = "This module"  # the demo continues it for 100+ tokens without EOS (greedy)


@pytest.fixture(scope="module")
def demo_path():
    return demo_gguf()


@pytest.fixture(scope="module")
def oracle(demo_path):
    """Greedy continuations straight from a separate engine: what the chat must show."""
    engine = Engine(demo_path, EngineConfig(n_ctx=512))
    cache = {}

    def text(prompt: str, max_tokens: int) -> str:
        if (prompt, max_tokens) not in cache:
            cache[prompt, max_tokens] = "".join(e.text for e in engine.stream_generate(prompt, max_tokens))
        return cache[prompt, max_tokens]

    yield text
    engine.close()


@pytest.fixture
def backend(demo_path):
    chat = open_backend(demo_path, "edgemoe", EngineConfig(n_ctx=512))
    yield chat
    chat.close()


def counting(monkeypatch, cls, name: str) -> list:
    """Record every call of cls.name (still calling it)."""
    calls = []
    original = getattr(cls, name)

    def spy(self, *args):
        calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(cls, name, spy)
    return calls


async def test_send_streams_text_and_stats(backend, oracle, monkeypatch):
    batches = counting(monkeypatch, ChatLog, "append")
    app = create_app(backend, Sampling(0.0, 1.0, 32))
    stats_seen = []
    async with app.run_test(size=SIZE) as pilot:
        original_show = app.show_stats
        monkeypatch.setattr(app, "show_stats", lambda s: (stats_seen.append(s), original_show(s)))
        await send(pilot, app, PROMPT)
        assert app.chat.generating
        await wait_reply(pilot, app)
        expected = oracle(PROMPT, 32)
        assert app.conversation.turns[-1].content == expected
        assert app.chat.log_view.messages[-1].text == expected
        assert len(batches) >= 2, "text arrives in several batches while it streams"
        assert "".join(args[1] for args in batches) == expected
        assert sum(s.generating for s in stats_seen) >= 1, "statistics update during generation"
        s = app.stats
        assert s.tokens == 32 and s.tokens_per_s > 0 and s.peak_rss_bytes > 0
        assert s.hit_rate is not None and 0 < s.hit_rate <= 1
        assert s.budget_bytes == backend.expert_bytes_total and 0 < s.resident_bytes <= s.budget_bytes
        assert s.bytes_per_token is not None and len(s.layer_hit_rate) == 4
        assert max(max(row) for row in s.heat) == pytest.approx(1.0)
        assert "tok/s" in str(app.chat.query_one("#summary").render())


async def test_cancel_mid_generation_then_continue(backend, oracle):
    app = create_app(backend, Sampling(0.0, 1.0, 400))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, PROMPT)
        await wait_until(pilot, lambda: app.chat.reply_view is not None and len(app.chat.reply_view.text) > 0)
        await pilot.press("escape")
        await wait_reply(pilot, app)
        view = app.chat.log_view.messages[-1]
        assert "stopped" in str(view.border_subtitle)
        partial = app.conversation.turns[-1].content
        assert 0 < app.stats.tokens < 400
        assert oracle(PROMPT, app.stats.tokens) == partial
        # the engine is free again: a second turn streams to the end
        app.sampling = Sampling(0.0, 1.0, 8)
        await send(pilot, app, "The os module")
        await wait_reply(pilot, app)
        assert app.conversation.turns[-1].role == "assistant"
        assert "stopped" not in str(app.chat.log_view.messages[-1].border_subtitle)


async def test_change_budget_and_policy_while_running(backend, monkeypatch):
    import time

    total = backend.expert_bytes_total
    model, forward = backend.engine.model, backend.engine.model.forward
    # 10 ms per token: the demo decodes ~1500 tok/s, a 32-token reply would end before the key press lands
    monkeypatch.setattr(model, "forward", lambda *a, **k: (time.sleep(0.01), forward(*a, **k))[1])
    app = create_app(backend, Sampling(0.0, 1.0, 32))
    shown = record_notifications(app, monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, PROMPT)
        await wait_until(pilot, lambda: app.stats.tokens >= 2)
        changes = []
        original_set = app.set_budget
        monkeypatch.setattr(app, "set_budget", lambda b: (changes.append(app.chat.generating), original_set(b))[1])
        await pilot.press("f5")  # budget -1/8 of all experts (press returns once the reply is done)
        assert changes == [True], "the change landed mid-generation"
        await wait_reply(pilot, app)
        await pilot.press("f5")
        assert backend.engine.cache.budget_bytes == total // 8 * 6
        assert app.stats.resident_bytes <= app.stats.budget_bytes == total // 8 * 6
        assert app.stats.tokens == 32

        # settings dialog: 25% applies at once, the cache evicts to fit before any token
        await pilot.press("f3")
        app.screen.query_one("#budget").value = "25%"
        await pilot.press("enter")
        await pilot.pause()
        assert backend.engine.cache.budget_bytes == int(total * 0.25)
        res = backend.engine.residency()
        assert res.resident_bytes <= int(total * 0.25)
        assert app.stats.budget_bytes == int(total * 0.25) and app.stats.resident_bytes == res.resident_bytes

        # below the largest expert: refused with a message, budget unchanged
        await pilot.press("f3")
        app.screen.query_one("#budget").value = "1KiB"
        await pilot.press("enter")
        await pilot.pause()
        assert backend.engine.cache.budget_bytes == int(total * 0.25)
        assert any("largest expert" in m for m in shown)

        assert backend.policy == "split"  # the default
        await pilot.press("f7")  # F7 cycles through the live policies
        assert backend.policy == "lru"
        await pilot.press("f7")
        assert backend.policy == "lfu"
        await send(pilot, app, "The os module")
        await wait_reply(pilot, app)
        assert app.stats.resident_bytes <= int(total * 0.25)
        assert app.stats.hit_rate is not None


async def test_engine_error_is_shown_and_chat_survives(backend, monkeypatch):
    real = backend.engine.stream_generate

    def failing(*args, **kwargs):
        for i, event in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise OSError("pread of expert (2, 5) failed: Input/output error")
            yield event

    monkeypatch.setattr(backend.engine, "stream_generate", failing)
    app = create_app(backend, Sampling(0.0, 1.0, 32))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, PROMPT)
        await wait_reply(pilot, app)
        error = app.chat.log_view.messages[-1]
        assert error.role == "error" and "Input/output error" in error.text
        monkeypatch.setattr(backend.engine, "stream_generate", real)
        await send(pilot, app, "The os module")
        await wait_reply(pilot, app)
        assert app.chat.log_view.messages[-1].role == "assistant"


async def test_multi_turn_copy_and_clear(backend, oracle, monkeypatch):
    prompts = counting(monkeypatch, type(backend), "stream")
    app = create_app(backend, Sampling(0.0, 1.0, 12))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "The os module provides")
        await wait_reply(pilot, app)
        await send(pilot, app, PROMPT)
        await wait_reply(pilot, app)
        first = oracle("The os module provides", 12)
        document = plain_text(app.conversation.turns[:3])
        assert document == "The os module provides" + first + ("" if first.endswith("\n") else "\n") + PROMPT
        assert prompts[-1][0] == backend.engine.tokenizer.encode(document)

        await pilot.press("ctrl+y")
        assert app.clipboard == app.conversation.turns[-1].content
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert app.conversation.turns == []
        assert [m.role for m in app.chat.log_view.messages] == ["note"]


async def test_views_open_and_close_in_80x24(backend):
    app = create_app(backend, Sampling(0.5, 0.8, 16))
    async with app.run_test(size=SIZE) as pilot:
        for key, name in (("f1", "HelpScreen"), ("f2", "StatsScreen"), ("f4", "InfoScreen"),
                          ("f3", "SettingsScreen")):
            await pilot.press(key)
            assert type(app.screen).__name__ == name
            await pilot.press("escape")
            assert app.screen is app.chat
        # settings: sampling for the next replies; a bad value is shown, not applied
        await pilot.press("f3")
        app.screen.query_one("#top-p").value = "1.5"
        await pilot.press("enter")
        assert "top-p" in str(app.screen.query_one("#settings-error").render())
        app.screen.query_one("#top-p").value = "0.95"
        app.screen.query_one("#temperature").value = "0"
        app.screen.query_one("#max-tokens").value = "20"
        await pilot.press("enter")
        assert app.screen is app.chat
        assert app.sampling == Sampling(0.0, 0.95, 20)
