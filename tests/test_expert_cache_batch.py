"""ExpertCache.acquire_many: the same hits, misses and evictions as acquiring one by one, the
misses read in one batch, and a batch larger than the budget refused before anything loads."""
from __future__ import annotations

import random

import numpy as np
import pytest

from edgemoe.demo import demo_gguf
from edgemoe.expert_cache import ExpertCache
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.policies import make_policy
from edgemoe.residency import BudgetError


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


@pytest.mark.parametrize("policy", ["lru", "lfu", "random"])
def test_batch_equals_one_by_one(demo, policy):
    raw = demo[0].read_bytes()
    batches = _layer_batches(demo[1], 12)
    one, many = _cache(demo, 0.3, policy), _cache(demo, 0.3, policy)
    try:
        for keys in batches:
            singles = [one.acquire(k) for k in keys]
            batch = many.acquire_many(keys)
            for a, b in zip(singles, batch):
                for p, pos in zip(a.spec.parts, a.spec.layout()[1]):
                    assert b.buffer[pos:pos + p.nbytes].tobytes() == raw[p.offset:p.offset + p.nbytes]
                    assert np.array_equal(a.buffer, b.buffer)
            for k in keys:
                one.release(k)
                many.release(k)
            assert one.resident == many.resident
            assert many.resident_bytes <= many.budget_bytes and not many.state.pins
        a, b = one.step_stats(), many.step_stats()
        assert (a.hits, a.misses, a.evictions, a.bytes_read) == (b.hits, b.misses, b.evictions, b.bytes_read)
        assert b.misses > 0 and b.evictions > 0
        assert many.loader.stats().reads <= len(batches), "one loader request per batch with misses"
    finally:
        one.close()
        many.close()


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
