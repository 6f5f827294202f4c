"""MoE-I² stage 1 as `edgemoe compress` runs it (converters/compress/search.py), on a tiny seeded
Mixtral streamed layer by layer: the streamed reference MoE agrees with transformers' own block,
importance/counts/candidates/KT field behave as specified, each checked against transformers
running the same drop sets (brute force over every drop set or combination)."""
from __future__ import annotations

import math
from dataclasses import replace
from itertools import combinations, product

import pytest
import torch

from edgemoe.converters.compress.genetic import GAConfig
from edgemoe.converters.compress.importance import expert_importance, prune_counts, uniform_counts
from edgemoe.converters.compress.lowrank import ranks_from_importance, svd_factors
from edgemoe.converters.compress.moe_view import dropped, moe_layers, moe_output
from edgemoe.converters.compress.options import METHODS, CompressError, CompressOptions, ModelShape, check_options
from edgemoe.converters.compress.search import PendingLayer, drop_counts, kt_block, layer_candidates
from oracles import rel_max_diff

OPTS = CompressOptions(prune=0.25, population=20, generations=15, keep_k=3, n_threads=1)
N_TOKENS, WINDOW = 64, 32   # two windows
REL_TOL_F16 = 5e-3


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(transformers model, its MoE layers, the Stream, per MoE layer (streamed MoELayer, its MoE
    input on the unpruned stream [N, D]), the unpruned stream after each decoder layer)."""
    from transformers import AutoModelForCausalLM

    from edgemoe.converters.arch import converter_for
    from edgemoe.converters.calib_text import calibration_text
    from edgemoe.converters.compress.stream import open_stream
    from edgemoe.converters.hf_checkpoint import HFCheckpoint

    ckpt = tiny_checkpoint("mixtral")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with open_stream(converter_for(HFCheckpoint(ckpt)), calibration_text(None), N_TOKENS, WINDOW, 1) as s:
        x, moes, after = s.embed(), {}, []
        for i in range(s.n_layers):
            x = s.attention(i, x)
            xn = s.ffn_input(i, x)
            moes[i] = (s.load_moe(i), xn)
            x = x + s.ffn(i, xn, moes[i][0])
            after.append(x)
        yield model, moe_layers(model), s, moes, after
    torch.set_num_threads(threads)


def hf_layer_error(layer, x: torch.Tensor, drop: tuple[int, ...]) -> float:
    """transformers' own block, with and without `drop` masked out of its router: ||Y - Y^-drop||_F."""
    with torch.no_grad():
        full = layer.block(x[None])[0]
        with dropped([layer], {layer.index: drop}):
            return (full - layer.block(x[None])[0]).norm().item()


def hf_stream_after(model, windows: list[list[int]], layer: int, drops: dict[int, tuple[int, ...]], layers):
    """transformers' hidden states after decoder layer `layer`, windows back to back: [N, D]."""
    got = []
    hook = model.model.layers[layer].register_forward_hook(lambda m, a, out: got.append(out[0] if isinstance(out, tuple)
                                                                                         else out))
    try:
        with dropped(layers, drops), torch.no_grad():
            for w in windows:
                model(torch.tensor([w]))
    finally:
        hook.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got])


def test_streamed_reference_moe_matches_the_model_block(tiny):
    _, layers, _, moes, _ = tiny
    moe, x = moes[layers[0].index]
    with torch.no_grad():
        want = layers[0].block(x[None])[0]
    torch.testing.assert_close(moe_output(moe, x), want, atol=1e-5, rtol=1e-4)


def test_dropping_masks_the_router_in_the_real_model(tiny):
    model, layers, s, _, _ = tiny
    seen = []
    hook = layers[0].block.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    with dropped(layers, {layers[0].index: (0, 1, 2)}), torch.no_grad():
        model(torch.tensor([s.windows[0]]))
    hook.remove()
    assert not torch.isin(seen[0], torch.tensor([0, 1, 2])).any()


def test_importance_is_the_loss_of_removing_each_expert(tiny):
    _, layers, _, moes, _ = tiny
    moe, x = moes[layers[0].index]
    imp = expert_importance(moe, x)
    assert imp.shape == (moe.n_experts,) and (imp >= 0).all() and imp.max() > 0
    want = torch.tensor([hf_layer_error(layers[0], x, (j,)) ** 2 for j in range(moe.n_experts)], dtype=imp.dtype)
    torch.testing.assert_close(imp, want, rtol=1e-3, atol=1e-6)


def test_prune_counts_favour_important_layers_and_keep_top_k():
    counts = prune_counts({0: 10.0, 1: 1.0, 2: 1.0}, {0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, 0.5)
    assert sum(counts.values()) == 12
    assert counts[0] < counts[1] and all(c <= 6 for c in counts.values())
    assert sum(uniform_counts({0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, 0.5).values()) == 12
    with pytest.raises(ValueError, match="fewer than top_k"):
        prune_counts({0: 1.0}, {0: 8}, {0: 2}, 0.9)


def test_genetic_candidates_are_ranked_by_layer_error_and_find_the_optimum(tiny):
    _, layers, _, moes, _ = tiny
    moe, x = moes[layers[1].index]
    found = layer_candidates(moe, x, 3, OPTS)
    assert math.comb(8, 3) > OPTS.population  # a real search, not enumeration
    brute = {d: hf_layer_error(layers[1], x, d) for d in combinations(range(8), 3)}
    assert found[0][0] == min(brute, key=brute.get)
    assert len(found) == OPTS.keep_k and len({d for d, _ in found}) == OPTS.keep_k
    errors = [e for _, e in found]
    assert errors == sorted(errors)
    for d, e in found:
        assert e == pytest.approx(brute[d], rel=1e-3)


def test_kt_field_picks_the_lowest_block_error_of_every_combination(tiny):
    model, layers, s, moes, after = tiny
    moe_ids = [l.index for l in layers]
    cands = {0: [(0,), (2,)], 1: [(5,), (1, 4)], 2: [(3,), (6,)]}
    pending = [PendingLayer(*moes[i], [(d, 0.0) for d in cands[i]]) for i in moe_ids]
    end = moe_ids[-1]
    choice, x_after, record = kt_block(s, s.embed(), after[end], 0, pending, lambda *a: None)
    assert record["combinations"] == 2 ** len(moe_ids) and record["layers"] == moe_ids

    ref = hf_stream_after(model, s.windows, end, {}, layers)
    brute = {}
    for combo in product(*(cands[i] for i in moe_ids)):
        drops = dict(zip(moe_ids, combo))
        brute[combo] = (hf_stream_after(model, s.windows, end, drops, layers) - ref).norm().item()
    ranked = sorted(brute, key=brute.get)
    assert brute[ranked[1]] > 1.01 * brute[ranked[0]]  # a clear winner: the test can tell them apart
    assert tuple(choice[i] for i in moe_ids) == ranked[0]
    x = s.embed()  # the winner's error again, run through the stream layer by layer
    for i in range(end + 1):
        x = s.attention(i, x)
        x = x + s.ffn(i, s.ffn_input(i, x), moes[i][0], choice[i])
    assert record["block_error"] == pytest.approx((x - after[end]).norm().item())
    assert record["block_error"] == pytest.approx(brute[ranked[0]], rel=1e-3)  # f16 dense weights vs f32
    assert record["chosen"] == {i: list(d) for i, d in zip(moe_ids, ranked[0])}
    # the stream's dense weights are f16 (stream.py), transformers' f32
    assert rel_max_diff(x_after.numpy(), hf_stream_after(model, s.windows, end, choice, layers).numpy()) < REL_TOL_F16


def test_every_method_drops_the_planned_count(tiny):
    _, layers, _, moes, _ = tiny
    shape = ModelShape({l.index: l.n_experts for l in layers}, layers[0].top_k, len(layers))
    small = replace(OPTS, population=4, generations=1, keep_k=1)
    importance = {i: expert_importance(m, x) for i, (m, x) in moes.items()}
    for method in METHODS:
        o = replace(small, method=method)
        counts = drop_counts(o, shape, importance)
        drops = {i: layer_candidates(*moes[i], counts[i], o)[0][0] for i in counts}
        assert sum(len(d) for d in drops.values()) == round(0.25 * 8 * len(layers)) == sum(counts.values())
        assert all(list(d) == sorted(set(d)) and all(0 <= e < 8 for e in d) for d in drops.values())
    with pytest.raises(CompressError, match="choose one of moe-i2"):
        check_options(replace(OPTS, method="magic"))
    with pytest.raises(ValueError, match="population"):
        GAConfig(population=1)
    with pytest.raises(CompressError, match="T must be at least 1"):
        check_options(replace(OPTS, block_t=0))


def test_low_rank_factors():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    x = torch.randn(256, 32) * torch.linspace(0.1, 3, 32)
    full = svd_factors(w, 32)
    torch.testing.assert_close(full.weight(), w, atol=1e-4, rtol=1e-4)
    plain, white = svd_factors(w, 8), svd_factors(w, 8, x)
    err = lambda f: ((w - f.weight()) @ x.T).norm()  # noqa: E731
    assert err(white) < err(plain)  # whitening minimises the output error, not the weight error
    ranks = ranks_from_importance(torch.tensor([1.0, 10.0, 100.0]), 64, 32, 0.5)
    assert ranks[0] < ranks[1] < ranks[2]
    with pytest.raises(ValueError, match="rank ratio"):
        ranks_from_importance(torch.ones(3), 64, 32, 0.0)
