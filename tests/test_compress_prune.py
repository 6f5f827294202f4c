"""MoE-I² stage 1 pieces on a tiny seeded Mixtral: the dense reference MoE agrees with the
model's own block, importance/counts/genetic search/KT field behave as specified."""
from __future__ import annotations

import math

import pytest
import torch

from edgemoe.converters.compress.calibration import moe_inputs
from edgemoe.converters.compress.genetic import GAConfig, LayerFitness, exhaustive_search, genetic_search
from edgemoe.converters.compress.importance import expert_importance, prune_counts, uniform_counts
from edgemoe.converters.compress.kt_field import hidden_after, kt_select
from edgemoe.converters.compress.moe_view import dropped, moe_layers, moe_output
from edgemoe.converters.compress.prune import plan_pruning
from edgemoe.converters.compress.lowrank import ranks_from_importance, svd_factors


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("mixtral"), dtype=torch.float32).eval()
    layers = moe_layers(model)
    windows = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return model, layers, windows, moe_inputs(model, layers, windows)


def test_reference_moe_matches_the_model_block(tiny):
    model, layers, _, inputs = tiny
    x = inputs[layers[0].index]
    with torch.no_grad():
        want = layers[0].block(x[None])[0]
    torch.testing.assert_close(moe_output(layers[0], x), want, atol=1e-5, rtol=1e-4)


def test_dropping_masks_the_router_in_the_real_model(tiny):
    model, layers, windows, inputs = tiny
    seen = []
    hook = layers[0].block.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    with dropped(layers, {layers[0].index: (0, 1, 2)}), torch.no_grad():
        model(windows[:1])
    hook.remove()
    assert not torch.isin(seen[0], torch.tensor([0, 1, 2])).any()


def test_importance_is_positive_and_ranks_experts(tiny):
    _, layers, _, inputs = tiny
    imp = expert_importance(layers[0], inputs[layers[0].index])
    assert imp.shape == (layers[0].n_experts,) and (imp >= 0).all() and imp.max() > 0


def test_prune_counts_favour_important_layers_and_keep_top_k():
    counts = prune_counts({0: 10.0, 1: 1.0, 2: 1.0}, {0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, 0.5)
    assert sum(counts.values()) == 12
    assert counts[0] < counts[1] and all(c <= 6 for c in counts.values())
    assert sum(uniform_counts({0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, 0.5).values()) == 12
    with pytest.raises(ValueError, match="fewer than top_k"):
        prune_counts({0: 1.0}, {0: 8}, {0: 2}, 0.9)


def test_genetic_search_finds_the_exhaustive_optimum(tiny):
    _, layers, _, inputs = tiny
    fit = LayerFitness(layers[1], inputs[layers[1].index])
    best = exhaustive_search(fit, 3)
    found = genetic_search(fit, 3, GAConfig(population=20, generations=15, elite=4, keep_best=3, seed=1))
    assert found[0][0] == best  # C(8,3)=56 > population: a real search, not enumeration
    assert math.comb(8, 3) > 20
    assert [e for _, e in found] == sorted(e for _, e in found)


def test_kt_field_picks_the_lowest_block_error(tiny):
    model, layers, windows, _ = tiny
    cands = {l.index: [(0,), (2,)] for l in layers}
    chosen, log = kt_select(model, layers, windows[:1], cands, block=len(layers))
    assert log[0]["combinations"] == 2 ** len(layers)
    ref = hidden_after(model, windows[:1], layers[-1].index)
    with dropped(layers, chosen):
        best = (hidden_after(model, windows[:1], layers[-1].index) - ref).norm().item()
    with dropped(layers, {l.index: (2,) for l in layers}):
        other = (hidden_after(model, windows[:1], layers[-1].index) - ref).norm().item()
    assert best == pytest.approx(log[0]["block_error"]) and best <= other


def test_plan_pruning_methods_and_errors(tiny):
    model, layers, windows, inputs = tiny
    for method in ("moei2", "random", "frequency", "naee"):
        plan = plan_pruning(method, model, layers, inputs, windows[:1, :8], 0.25,
                            GAConfig(population=4, generations=1, elite=1, keep_best=1))
        assert sum(len(d) for d in plan.drops.values()) == round(0.25 * 8 * len(layers))
    with pytest.raises(ValueError, match="unknown pruning method"):
        plan_pruning("magic", model, layers, inputs, windows, 0.25)
    with pytest.raises(ValueError, match="population"):
        GAConfig(population=1)
    with pytest.raises(ValueError, match="block size"):
        kt_select(model, layers, windows, {l.index: [()] for l in layers}, block=0)


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
