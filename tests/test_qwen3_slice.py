"""The Qwen3-30B-A3B-shaped slice: true dimensions, stock llama.cpp loads and runs it, the engine
matches llama.cpp's logits at the q4_k tolerance, and its routing follows the recorded real
routing's skew instead of being uniform."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.models.qwen3_slice import (FF_EXPERT, HEAD_DIM, HIDDEN, MAX_FREQUENCY, N_EXPERT, N_HEAD, N_KV, TOP_K,
                                        VOCAB, router_sigmas, target_frequencies)


def test_target_frequencies_are_top8_shares_of_the_real_routing():
    t = target_frequencies(16)
    assert t.shape == (16, N_EXPERT)
    assert np.allclose(t.sum(axis=1), TOP_K)
    assert t.max() <= MAX_FREQUENCY + 1e-9 and t.min() > 0
    top16 = np.sort(t, axis=1)[:, ::-1][:, :16].sum(axis=1) / TOP_K
    assert top16.min() > 0.25 and top16.max() > 0.6  # early layers diffuse, later ones concentrated; uniform: 0.125


def test_router_sigmas_reproduce_the_target_on_fresh_samples():
    target = target_frequencies(16)[6]
    sigma = router_sigmas(target, np.random.default_rng(0))
    logits = np.random.default_rng(1).standard_normal((20000, N_EXPERT)) * sigma
    top = np.argpartition(-logits, TOP_K, axis=1)[:, :TOP_K]
    freq = np.bincount(top.ravel(), minlength=N_EXPERT) / len(logits)
    assert np.abs(freq - target).max() < 0.04


@pytest.fixture(scope="module")
def slice_2l():
    from edgemoe.models.cache import cache_dir
    from edgemoe.models.qwen3_slice import write_qwen3_slice

    path = cache_dir("bench") / "qwen3-slice-2L-q4_k.gguf"
    if not path.exists():
        write_qwen3_slice(path, 2, "q4_k")
    return path


@pytest.mark.slow
def test_slice_has_true_dims_and_runs_in_llama_cpp(slice_2l):
    from edgemoe.gguf_file import GGUFFile
    from edgemoe.llama_backend import open_llama, stream_generate

    f = GGUFFile(slice_2l)
    assert f.arch == "qwen3moe"
    assert [int(f.arch_field(k)) for k in ("embedding_length", "expert_count", "expert_used_count",
                                          "expert_feed_forward_length", "attention.head_count",
                                          "attention.head_count_kv", "attention.key_length")] == \
        [HIDDEN, N_EXPERT, TOP_K, FF_EXPERT, N_HEAD, N_KV, HEAD_DIM]
    shapes = {name: tuple(t.shape) for name, t in f.tensors.items()}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (N_EXPERT, FF_EXPERT, HIDDEN)
    assert shapes["blk.1.ffn_down_exps.weight"] == (N_EXPERT, HIDDEN, FF_EXPERT)
    assert shapes["blk.0.attn_q.weight"] == (N_HEAD * HEAD_DIM, HIDDEN)
    assert shapes["token_embd.weight"] == (VOCAB, HIDDEN)
    llm = open_llama(slice_2l, n_ctx=64, n_threads=2)
    try:
        tokens = [e.token for e in stream_generate(llm, "def read_file(path):", 6)]
    finally:
        llm.close()
    assert len(tokens) == 6 and all(0 <= t < VOCAB for t in tokens)


@pytest.mark.slow
def test_engine_matches_llama_cpp_and_routing_is_skewed(slice_2l):
    from edgemoe.engine import Engine
    from oracles import llama_logits, rel_max_diff, top1_agreement
    from test_engine_archs import MIN_TOP1, PROMPT_IDS, REL_TOL

    ref = llama_logits(slice_2l, PROMPT_IDS)
    engine = Engine(slice_2l)
    try:
        got = engine.logits(PROMPT_IDS)
        chosen = [b.last_ids.numpy() for b in engine.model.moe_blocks]  # [tokens, k] per layer
    finally:
        engine.close()
    assert rel_max_diff(got, ref) < REL_TOL["q4_k"]
    assert top1_agreement(got, ref) >= MIN_TOP1["q4_k"]
    targets = target_frequencies(2)
    for layer, ids in enumerate(chosen):
        hot = np.argsort(-targets[layer])[:16]
        share = np.isin(ids, hot).mean()  # uniform routing would put 16/128 = 0.125 of the picks there
        assert share > 0.25, f"layer {layer}: {share:.2f} of the picks in the target's 16 hottest experts"
