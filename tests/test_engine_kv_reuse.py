"""KV prefix reuse (`stream_generate(..., reuse_kv=True)`): a prompt that extends what the last
generation left in the KV cache prefills only the new tokens, and gives what a whole prefill
gives (oracle: the same prompt prefilled from an empty cache)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.demo import demo_gguf
from edgemoe.engine import Engine, EngineConfig, common_prefix

PROMPT = "The os module provides"


@pytest.fixture(scope="module")
def engine():
    e = Engine(demo_gguf(), EngineConfig(n_ctx=256))
    yield e
    e.close()


def _run(engine, prompt, n, **kw):
    events = list(engine.stream_generate(prompt, n, stop_at_eos=False, **kw))
    return [e.token for e in events], events


def _slots_per_token(engine) -> int:
    # token x chosen-expert pairs of one token: every MoE layer routes it to its top-k experts
    return len(engine.model.moe_blocks) * int(engine.file.arch_field("expert_used_count"))


def test_common_prefix():
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_logits_after_a_kept_prefix_equal_a_whole_prefill(engine):
    """The mechanism reuse rests on: K/V written at positions 0..n-1 by one forward pass, then
    the rest forwarded at n, give the logits of one pass over everything."""
    ids = engine.tokenizer.encode(PROMPT + " functions for files, paths and processes")
    want = engine.logits(ids)
    n = 5
    kv = engine.model.new_kv(len(ids))
    with torch.no_grad():
        engine.model.forward(ids[:n], kv, 0)
        got = engine.model.forward(ids[n:], kv, n, all_logits=True).numpy()
    np.testing.assert_allclose(got, want[n:], rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == want[n:].argmax(-1)).all()


def test_extending_prompt_prefills_only_the_new_tokens(engine):
    first_ids = engine.tokenizer.encode(PROMPT)
    tokens, _ = _run(engine, first_ids, 12, reuse_kv=True)
    # the next "turn": the prompt, the reply, then more text (as a chat re-encodes its history)
    follow = first_ids + tokens + engine.tokenizer.encode("\nThe sys module", add_bos=False)
    reused_tokens, reused = _run(engine, follow, 16, reuse_kv=True)
    # every token the KV cache held is reused: the prompt and the reply but its last token,
    # which was sampled and never forwarded
    assert reused[0].kv_reused_tokens == len(first_ids) + len(tokens) - 1
    assert reused[0].prompt_tokens == len(follow)
    new = len(follow) - reused[0].kv_reused_tokens
    assert reused[0].cache.token_slots == new * _slots_per_token(engine)  # what the prefill computed
    fresh_tokens, fresh = _run(engine, follow, 16)  # reuse off: the whole prompt again
    assert fresh[0].kv_reused_tokens == 0
    assert fresh[0].cache.token_slots == len(follow) * _slots_per_token(engine)
    assert reused_tokens == fresh_tokens


def test_divergent_and_repeated_prompts(engine):
    a = engine.tokenizer.encode(PROMPT + " functions for files")
    b = engine.tokenizer.encode(PROMPT + " a way to run commands")
    k = common_prefix(a, b)
    assert 0 < k < min(len(a), len(b))
    _run(engine, a, 4, reuse_kv=True)
    got, events = _run(engine, b, 10, reuse_kv=True)
    assert events[0].kv_reused_tokens == k  # stale positions after the divergence are recomputed
    want, _ = _run(engine, b, 10)
    assert got == want
    again, events = _run(engine, b, 10, reuse_kv=True)  # the same prompt: only its last token runs
    assert events[0].kv_reused_tokens == len(b) - 1
    assert again == want


def test_sampled_tokens_with_a_seed_match_and_a_cancelled_stream_leaves_a_valid_cache(engine):
    ids = engine.tokenizer.encode(PROMPT)
    stream = engine.stream_generate(ids, 20, stop_at_eos=False, reuse_kv=True)
    got = [next(stream).token for _ in range(5)]
    stream.close()  # a client went away after 5 tokens
    follow = ids + got + engine.tokenizer.encode(" and", add_bos=False)
    reused, events = _run(engine, follow, 12, reuse_kv=True, temperature=0.8, top_p=0.9, seed=7)
    assert events[0].kv_reused_tokens == len(ids) + len(got) - 1
    fresh, _ = _run(engine, follow, 12, temperature=0.8, top_p=0.9, seed=7)
    assert reused == fresh
    other, _ = _run(engine, follow, 12, temperature=0.8, top_p=0.9, seed=8)
    assert other != fresh  # the seed is this call's, not a constant


def test_finish_reason(engine):
    _, events = _run(engine, PROMPT, 3)
    assert [e.finish_reason for e in events] == ["", "", "length"]
    assert events[-1].finished
