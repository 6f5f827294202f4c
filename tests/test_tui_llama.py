"""`edgemoe chat --backend llama`: the same app on stock llama.cpp, with the statistics it has."""
from __future__ import annotations

import pytest
from test_tui_fakes import record_notifications, send, wait_reply

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
