"""The `split` policy: fewer misses than LRU and LFU on real routing (a Qwen3-30B-A3B trace,
tests/data), the hard budget and the split's invariants on every step, shares that follow each
layer's own concentration while it runs."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from edgemoe.policies import LayerSplit
from edgemoe.residency import Residency
from edgemoe.simulate import layer_step, simulate
from edgemoe.trace import Trace

# real routing: docs/BENCHMARKS.md says where it comes from (Apache-2.0, converted row for row)
QWEN = Path(__file__).parent / "data" / "qwen3-30b-a3b.trace.json"


@pytest.fixture(scope="module")
def qwen() -> Trace:
    return Trace.load(QWEN)


def _budget(trace: Trace, share: float) -> int:
    return int(sum(trace.expert_bytes.values()) * share)


def _misses(trace: Trace, share: float) -> dict[str, int]:
    return {p: simulate(trace, _budget(trace, share), p).misses for p in ("split", "lru", "lfu")}


# split's demand misses over the 128 decode steps (36,864 accesses); the same replay gives the same
# counts. LRU / LFU at these budgets: 22,981 / 23,488, 18,517 / 17,212, 6,505 / 6,596, 1,363 / 1,363.
SPLIT_MISSES = {0.05: 22609, 0.10: 16126, 0.25: 6094, 0.50: 1336}


def test_split_beats_lru_and_lfu_on_real_routing(qwen):
    got = _misses(qwen, 0.25)
    assert got["split"] == SPLIT_MISSES[0.25]
    assert got["split"] < min(got["lru"], got["lfu"]), got


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.05, 0.10, 0.50])
def test_split_beats_lru_and_lfu_at_every_budget(qwen, share):
    got = _misses(qwen, share)
    assert got["split"] == SPLIT_MISSES[share]
    assert got["split"] < min(got["lru"], got["lfu"]), got


def test_budget_and_shares_hold_on_every_step(qwen):
    """Replayed as the engine acquires a layer's experts: resident + in-flight bytes never exceed
    the budget, and the shares the curves ask for never sum past it."""
    trace = qwen.sliced(0, 24)
    for share in (0.05, 0.25):
        budget = _budget(trace, share)
        policy = LayerSplit()
        state = Residency(trace.expert_bytes, budget, policy)
        for step in trace.steps:
            for layer in sorted(step):
                layer_step(state, layer, Counter(e for tok in step[layer] for e in tok))
                assert state.used() <= budget
            shares = policy.shares()
            assert sum(shares.values()) <= budget and min(shares.values()) >= 0
            assert set(shares) == set(trace.moe_layers)
        assert state.peak_bytes <= budget


def _two_layer_trace(phases: list[tuple[int, int, int]], seed: int = 0) -> Trace:
    """Top-2 routing over 16 experts in 2 layers; per phase (tokens, a, b): layer 0 picks among
    its first `a` experts, layer 1 among its first `b`, uniformly."""
    rng = random.Random(seed)
    sizes = {(l, e): 1000 for l in (0, 1) for e in range(16)}
    steps = []
    for n, a, b in phases:
        for _ in range(n):
            steps.append({0: [sorted(rng.sample(range(a), 2))], 1: [sorted(rng.sample(range(b), 2))]})
    return Trace("synthetic.gguf", 16, 2, [0, 1], sizes, steps)


def test_shares_follow_each_layers_concentration():
    """Layer 1 concentrated on 3 experts, layer 0 spread over 16: with room for 8 experts the
    split keeps layer 1's 3 and gives layer 0 the rest. When the two swap, what each layer holds
    follows within 50 tokens; the stated shares (from all the curves' history) follow once the
    new routing outweighs the old."""
    trace = _two_layer_trace([(100, 16, 3), (300, 3, 16)])
    policy = LayerSplit()
    state = Residency(trace.expert_bytes, 8 * 1000, policy)
    held, shares = {}, {}
    for i, step in enumerate(trace.steps):
        for layer in sorted(step):
            layer_step(state, layer, Counter(e for tok in step[layer] for e in tok))
        held[i] = {l: len(es) for l, es in policy.resident.items()}
        shares[i] = {l: n // 1000 for l, n in policy.shares().items()}
    assert held[99] == shares[99] == {0: 5, 1: 3}
    assert held[149] == {0: 3, 1: 5}
    assert shares[399] == {0: 3, 1: 5}
    got = {p: simulate(trace, 8 * 1000, p).misses for p in ("split", "lru")}
    assert got["split"] < got["lru"], got


def _decode_tokens(trace: Trace):
    """Per decode token: its layer steps as the engine counts them (keys ascending, 1 slot each)."""
    for step in trace.steps:
        if all(len(tokens) == 1 for tokens in step.values()):
            yield [([(layer, e) for e in sorted(set(step[layer][0]))], [1] * len(set(step[layer][0])))
                   for layer in sorted(step)]


def _curves(policy: LayerSplit):
    return {layer: [c.last.tolist(), c.count.tolist(), c.decayed.tolist(), c.at_rank.tolist(), c.pending]
            for layer, c in policy.curves.items()}


@pytest.mark.parametrize("limit", [None, 100])
def test_held_tokens_told_to_the_policy_when_it_decides(qwen, monkeypatch, limit):
    """count_held (a token over every expert held) counts its hits at once and tells the policy
    only before its next decision: then the policy's state, the clock, the counters and the
    victims of a budget lowered live are those of touch_step + hit of each key. At most
    DEFERRED_STEPS wait: beyond, the oldest are never told (the same as a policy that never saw them)."""
    import edgemoe.residency as residency
    if limit is not None:
        monkeypatch.setattr(residency, "DEFERRED_STEPS", limit)
    full = sum(qwen.expert_bytes.values())
    told, held = (Residency(qwen.expert_bytes, full, LayerSplit()) for _ in range(2))
    for state in (told, held):
        for key in sorted(qwen.expert_bytes):
            state.preload(key)
    tokens = list(_decode_tokens(qwen))[:40]
    steps = [step for token in tokens for step in token]
    dropped = 0 if limit is None else len(steps) - limit
    for i, (keys, slots) in enumerate(steps):
        if i < dropped:
            told.clock += len(keys)
            told.c.hits += len(keys)
            continue
        told.touch_step(keys, slots)
        for key in keys:
            told.hit(key)
    for token in tokens:
        held.count_held(token)
    assert held.c == told.c and held.clock == told.clock
    assert len(held.deferred) == len(steps) - dropped          # nothing told yet
    assert _curves(held.policy) == _curves(told.policy) and not held.deferred
    for state in (told, held):
        state.set_budget(full // 10)
    assert held.resident == told.resident and held.c == told.c
