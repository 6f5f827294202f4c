"""`edgemoe chat --backend llama`: the same app on stock llama.cpp, with the statistics it has."""
from __future__ import annotations

import pytest
from test_tui_fakes import record_notifications, send, wait_reply, wait_until

from edgemoe.demo import demo_gguf
from edgemoe.engine import Engine, EngineConfig
from edgemoe.tui import Sampling, create_app, open_backend

pytestmark = pytest.mark.asyncio
PROMPT = "This module"


@pytest.fixture(scope="module")
def llama_chat():
    chat = open_backend(demo_gguf(), "llama", EngineConfig(n_ctx=512))
    yield chat
    chat.close()


async def test_llama_backend_chat_and_stats(llama_chat, monkeypatch):
    app = create_app(llama_chat, Sampling(0.0, 1.0, 24))
    shown = record_notifications(app, monkeypatch)
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, app, PROMPT)
        await wait_reply(pilot, app)
        reply = app.conversation.turns[-1].content
        engine = Engine(demo_gguf(), EngineConfig())
        try:  # the demo's greedy parity between llama.cpp and the engine holds in the chat too
            assert reply == "".join(e.text for e in engine.stream_generate(PROMPT, 24))
        finally:
            engine.close()
        s = app.stats
        assert not s.has_cache and s.hit_rate is None and s.budget_bytes == 0
        assert s.tokens >= 20 and s.tokens_per_s > 0 and s.peak_rss_bytes > 0
        assert len(s.heat) == 4 and max(max(row) for row in s.heat) == pytest.approx(1.0), \
            "routing heat comes from llama.cpp's ffn_moe_topk tensors"
        assert "llama.cpp" in str(app.chat.query_one("#summary").render())

        await pilot.press("f5")
        assert any("no expert budget" in m for m in shown)
        await pilot.press("f3")
        assert app.screen.query_one("#budget").disabled and app.screen.query_one("#policy").disabled
        await pilot.press("escape")

        await send(pilot, app, "The os module")  # a second turn: the whole document again
        await wait_reply(pilot, app)
        assert app.conversation.turns[-1].role == "assistant"


async def test_a_budget_change_that_reloads_runs_off_the_ui_thread(monkeypatch):
    """Budgeted llama.cpp at a full budget loads in llama.cpp's default layout; a lower budget
    reloads the model (slots layout). The reload runs in a worker: the app answers meanwhile,
    a second change is refused until it is done, and the next reply is plain llama.cpp's."""
    import threading

    from test_tui_fakes import ScriptedChat

    gate = threading.Event()
    scripted = ScriptedChat(["a "] * 4, reload_gate=gate)
    app = create_app(scripted, Sampling(0.0, 1.0, 4))
    shown = record_notifications(app, monkeypatch)
    async with app.run_test(size=(80, 24)) as pilot:
        before = app.stats.budget_bytes
        assert app.set_budget(before // 2) and app.reloading
        assert any("Reloading the model" in m for m in shown)
        await pilot.press("f1")  # the UI thread is free while the reload waits
        await pilot.pause()
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        assert not app.set_budget(before // 4) and any("still reloading" in m for m in shown)
        gate.set()
        await wait_until(pilot, lambda: not app.reloading)
        assert app.stats.budget_bytes == scripted.budget_bytes == before // 2

    from edgemoe.llama_budget import budget_range

    full = budget_range(demo_gguf())[1]  # every expert, as the budgeted mode counts them
    chat = open_backend(demo_gguf(), "llama", EngineConfig(n_ctx=512, budget_bytes=full))
    try:
        assert chat.runtime.layout == "default" and chat.budget_reloads(full // 2) and not chat.budget_reloads(full)
        app = create_app(chat, Sampling(0.0, 1.0, 24))
        record_notifications(app, monkeypatch)
        async with app.run_test(size=(80, 24)) as pilot:
            assert app.set_budget(full // 2) and app.reloading
            await wait_until(pilot, lambda: not app.reloading)
            assert chat.runtime.layout == "slots" and app.stats.budget_bytes == full // 2
            assert not chat.budget_reloads(full // 4)  # resized in place from now on
            await send(pilot, app, PROMPT)
            await wait_reply(pilot, app)
            engine = Engine(demo_gguf(), EngineConfig())
            try:  # plain llama.cpp's greedy reply on the demo (the first test: the engine's)
                assert app.conversation.turns[-1].content == "".join(e.text for e in engine.stream_generate(PROMPT, 24))
            finally:
                engine.close()
    finally:
        chat.close()
