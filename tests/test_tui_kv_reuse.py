"""A multi-turn chat prefills only each new turn (both backends), and says the same as a chat
that prefills the whole conversation every turn (the oracle: reuse off)."""
from __future__ import annotations

import pytest

from edgemoe.bench.turns import USER_TURNS
from edgemoe.demo import demo_gguf
from edgemoe.engine import EngineConfig
from edgemoe.tui.backends import open_backend
from edgemoe.tui.generation import generate_reply
from edgemoe.tui.prompt import Conversation, Sampling
from edgemoe.tui.stats import StatsTracker

SAMPLING = Sampling(0.0, 1.0, 16)


def _chat(backend, n_turns: int = 3):
    """Run the chat's own reply loop for `n_turns` user turns; returns the replies and each
    turn's first event."""
    firsts, replies = [], []
    original = backend.stream

    def recording(ids, sampling):
        stream = original(ids, sampling)
        first = next(stream)
        firsts.append(first)
        yield first
        yield from stream

    backend.stream = recording
    info = backend.info
    tracker = StatsTracker(backend.name, backend.controls_cache, info.moe_layers, info.n_experts,
                           backend.expert_bytes_total)
    conversation = Conversation()
    for text in USER_TURNS[:n_turns]:
        conversation.add("user", text)
        reply = generate_reply(backend, conversation, SAMPLING, tracker, lambda _: None, lambda _: None,
                               lambda: False)
        assert reply.error is None
        conversation.add("assistant", reply.text)
        replies.append(reply.text)
    return replies, firsts


@pytest.mark.parametrize("kind", ["edgemoe", "llama"])
def test_each_turn_prefills_only_what_it_adds(kind):
    with_reuse = open_backend(demo_gguf(), kind, EngineConfig(n_ctx=512))
    without = open_backend(demo_gguf(), kind, EngineConfig(n_ctx=512), reuse_kv=False)
    try:
        evaluated = []
        if kind == "llama":  # count what llama.cpp itself evaluated, not what we expect it to
            import llama_cpp

            original = with_reuse.stream

            def counting(ids, sampling):
                llama_cpp.llama_perf_context_reset(with_reuse.llm.ctx)
                n = 0
                for n, event in enumerate(original(ids, sampling), 1):
                    yield event
                perf = llama_cpp.llama_perf_context(with_reuse.llm.ctx)
                evaluated.append(perf.n_p_eval + perf.n_eval - (n - 1))  # minus one eval per decoded token
            with_reuse.stream = counting
        replies, firsts = _chat(with_reuse)
        want, full = _chat(without)
    finally:
        with_reuse.close()
        without.close()
    assert replies == want
    assert [f.kv_reused_tokens for f in full] == [0, 0, 0]
    assert firsts[0].kv_reused_tokens == 0
    for prev, turn in zip(firsts, firsts[1:]):
        # the previous prompt and (but its last token) its reply are in the KV cache; the new
        # prompt re-encodes them, so at least the previous prompt is reused
        assert prev.prompt_tokens <= turn.kv_reused_tokens < turn.prompt_tokens
        assert turn.prompt_tokens - turn.kv_reused_tokens < turn.prompt_tokens - prev.prompt_tokens + 2
    if kind == "llama":
        assert evaluated == [f.prompt_tokens - f.kv_reused_tokens for f in firsts]
    else:  # the engine's prefill computed only the new tokens: token x expert slots of event 0
        per_token = full[0].cache.token_slots // full[0].prompt_tokens
        assert [f.cache.token_slots for f in firsts] == [(f.prompt_tokens - f.kv_reused_tokens) * per_token
                                                        for f in firsts]
