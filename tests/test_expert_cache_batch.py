"""ExpertCache.acquire_many: the same hits, misses and evictions as the simulator's replay of a
layer step (all touched, resident ones pinned as hits, then the misses make room), the misses
read in one batch, and a batch larger than the budget refused before anything loads."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from edgemoe.demo import demo_gguf
from edgemoe.expert_cache import ExpertCache
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.policies import make_policy
from edgemoe.residency import BudgetError, Residency
from edgemoe.simulate import layer_step


@pytest.fixture(scope="module")
def demo():
    path = demo_gguf()
    return path, stock_experts(GGUFFile(path))


def _cache(demo, share, policy):
    path, specs = demo
    total = sum(s.alloc_bytes for s in specs.values())
    n_layers = 1 + max(k[0] for k in specs)
    return ExpertCache(path, specs, int(total * share), make_policy(policy, seed=0), n_layers)


def _layer_batches(specs, n_steps, seed=0):
    rng = random.Random(seed)
    layers = sorted({k[0] for k in specs})
    n_expert = 1 + max(k[1] for k in specs)
    return [[(layer, e) for e in sorted(rng.sample(range(n_expert), 2))] for _ in range(n_steps) for layer in layers]


@pytest.mark.parametrize("policy", ["lru", "lfu", "random", "split"])
def test_batch_equals_replay(demo, policy):
    raw = demo[0].read_bytes()
    batches = _layer_batches(demo[1], 12)
    many = _cache(demo, 0.3, policy)
    replay = Residency(dict(many.state.sizes), many.budget_bytes, make_policy(policy, seed=0))
    hits = misses = 0
    try:
        for keys in batches:
            batch = many.acquire_many(keys, [1] * len(keys))
            h, missed, _ = layer_step(replay, keys[0][0], Counter(e for _, e in keys))
            hits, misses = hits + h, misses + len(missed)
            for k, b in zip(keys, batch):
                for p, pos in zip(b.spec.parts, b.spec.layout()[1]):
                    assert b.buffer[pos:pos + p.nbytes].tobytes() == raw[p.offset:p.offset + p.nbytes]
            for k in keys:
                many.release(k)
            assert many.resident == replay.resident
            assert many.resident_bytes <= many.budget_bytes and not many.state.pins
        b = many.step_stats()
        assert (b.hits, b.misses, b.evictions) == (hits, misses, replay.c.evictions)
        assert b.misses > 0 and b.evictions > 0
        assert many.loader.stats().reads <= len(batches), "one loader request per batch with misses"
    finally:
        many.close()


def test_batch_never_evicts_what_the_step_hits(demo):
    """Two resident experts of a layer, a step that needs one of them and a new one: the miss
    evicts the other, not the one the same step is about to use (one by one, LRU would)."""
    path, specs = demo
    size = max(s.alloc_bytes for s in specs.values())
    cache = ExpertCache(path, specs, 2 * size, make_policy("lru"), 1 + max(k[0] for k in specs))
    try:
        for key in ((0, 2), (0, 1)):
            cache.acquire(key)
            cache.release(key)
        cache.step_stats()
        # (0, 2) is the least recently used and needed now, after the miss (0, 0) in the step's order
        cache.acquire_many([(0, 0), (0, 2)])
        assert cache.resident == {(0, 0), (0, 2)}
        stats = cache.step_stats()
        assert (stats.hits, stats.misses) == (1, 1)
    finally:
        cache.close()


def test_batch_over_the_budget_is_refused_whole(demo):
    path, specs = demo
    size = max(s.alloc_bytes for s in specs.values())
    cache = ExpertCache(path, specs, 2 * size, make_policy("lru"), 1 + max(k[0] for k in specs))
    try:
        with pytest.raises(BudgetError, match="do not fit the expert budget"):
            cache.acquire_many([(0, 0), (0, 1), (0, 2)])
        assert not cache.resident and not cache.state.pins and cache.in_flight_bytes == 0
    finally:
        cache.close()
