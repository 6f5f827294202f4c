"""Prefetch admission (`Residency.room_for_prefetch`, used by ExpertCache.prefetch and the
replay): a prefetch its layer routed past unused is evicted first, prefetches still waiting for
their layer are never evicted by another prefetch; the prefetcher skips guesses whose layer has
routed; `cooccur`'s probabilities are calibrated on real routing (predicted vs observed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.demo import demo_gguf
from edgemoe.expert_cache import ExpertCache
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.policies import make_policy
from edgemoe.predictor.base import RoutingShape, make_predictor
from edgemoe.predictor.replay import experts_at, queries, target
from edgemoe.residency import Residency
from edgemoe.trace import Trace

QWEN = Path(__file__).parent / "data" / "qwen3-30b-a3b.trace.json"
SIZES = {(l, e): 1000 for l in (0, 1) for e in range(4)}


def _load(state: Residency, key, prefetched: bool) -> None:
    state.begin_load(key)
    state.finish_load(key, state.sizes[key], prefetched=prefetched)


def _route(state: Residency, key) -> None:
    """One demand access that hits or loads, as a layer step of one expert."""
    state.touch(key)
    if key in state.resident:
        state.hit(key)
    else:
        assert state.make_room(state.sizes[key])
        _load(state, key, prefetched=False)


def test_a_prefetch_its_layer_did_not_use_goes_first():
    state = Residency(SIZES, 3000, make_policy("lru"))
    for key in ((0, 0), (1, 0)):
        _route(state, key)
    assert state.room_for_prefetch((1, 1))
    _load(state, (1, 1), prefetched=True)
    # (1, 1) waits for layer 1: the next prefetch evicts the least recently used expert instead
    assert state.room_for_prefetch((1, 2))
    assert (1, 1) in state.resident and (0, 0) not in state.resident
    _load(state, (1, 2), prefetched=True)
    _route(state, (1, 2))  # layer 1 routes (1, 2), not (1, 1): (1, 1) is stale now
    assert list(state.stale) == [(1, 1)]
    _route(state, (0, 3))  # a demand miss evicts the stale guess, not LRU's choice (1, 0)
    assert (1, 1) not in state.resident and (1, 0) in state.resident
    assert state.c.prefetch_wasted == 1 and state.c.prefetch_hits == 1


def test_waiting_prefetches_are_not_evicted_by_prefetches():
    state = Residency(SIZES, 2000, make_policy("lru"))
    for key in ((1, 0), (1, 1)):
        assert state.room_for_prefetch(key)
        _load(state, key, prefetched=True)
    assert not state.room_for_prefetch((1, 2))  # both still wait for layer 1
    assert state.resident == {(1, 0), (1, 1)}


def test_expert_cache_prefetch_admits_as_the_replay():
    """The engine's and the budgeted llama.cpp mode's prefetch path is the same rule: a guess its
    layer did not use goes before the policy's choice, a waiting one is never evicted by a
    prefetch."""
    path = demo_gguf()
    specs = stock_experts(GGUFFile(path))
    size = max(s.alloc_bytes for s in specs.values())
    cache = ExpertCache(path, specs, 3 * size, make_policy("lru"), 1 + max(k[0] for k in specs))
    try:
        for key in ((0, 0), (1, 0)):
            cache.acquire_many([key])
            cache.release(key)
        assert cache.prefetch((1, 1))
        assert not cache.prefetch((1, 1))  # resident already
        assert cache.prefetch((1, 2))  # evicts LRU's (0, 0), not the waiting (1, 1)
        assert cache.resident == {(1, 0), (1, 1), (1, 2)}
        cache.acquire_many([(1, 2)])  # layer 1 routes (1, 2): (1, 1) is stale
        cache.release((1, 2))
        cache.acquire_many([(0, 3)])  # the miss evicts the stale guess, not LRU's (1, 0)
        cache.release((0, 3))
        assert cache.resident == {(1, 0), (1, 2), (0, 3)}
        stats = cache.step_stats()
        assert (stats.prefetch_hits, stats.prefetch_wasted) == (1, 1)
    finally:
        cache.close()


def test_cooccur_probabilities_are_calibrated_on_real_routing():
    """Offered experts grouped by their calibrated probability: the frequency with which the
    target layer chose them is within 0.1 of the mean probability in every group with enough
    samples (naive Bayes alone said >= 0.9 for experts chosen 75% of the time)."""
    trace = Trace.load(QWEN)
    predictor = make_predictor("cooccur", RoutingShape.of_trace(trace))
    said, came = [], []
    for pt in queries(trace):
        predictor.observe(pt.index, pt.ids)
        t = target(trace, pt.step, pt.index, 1)
        if t is None:
            continue
        want = experts_at(trace, *t)
        for _, e, p in predictor.candidates(pt.query):
            said.append(p)
            came.append(e in want)
    said, came = np.array(said), np.array(came, float)
    groups = np.minimum((said * 5).astype(int), 4)
    checked = 0
    for g in range(5):
        inside = groups == g
        if inside.sum() >= 500:
            assert abs(said[inside].mean() - came[inside].mean()) < 0.1, (g, said[inside].mean(), came[inside].mean())
            checked += 1
    assert checked >= 3


def test_reliability_maps_raw_to_observed():
    """Raw 0.9 that comes true half the time reads as about 0.5 after enough observations; an
    empty bin returns the raw value."""
    from edgemoe.predictor.calibration import Reliability

    r = Reliability()
    raw = np.array([0.9, 0.01])
    assert np.allclose(r.calibrated(raw), raw)
    for i in range(200):
        r.record(raw, np.array([float(i % 2), 0.0]))
    got = r.calibrated(raw)
    assert abs(got[0] - 0.5) < 0.01 and got[1] < 0.01


def test_prefetcher_skips_guesses_whose_layer_has_routed():
    """A prediction handled after its layer routed is not loaded (it would wait for the next
    token and hold room); the rest go to the cache in order."""
    from types import SimpleNamespace

    from edgemoe.predictor.base import Predictor
    from edgemoe.prefetch import Prefetcher

    class Offers(Predictor):  # fixed offers: this test is about the prefetcher, not a predictor
        shape = RoutingShape("m", (0, 1, 2), 4, 1)

        def candidates(self, q):
            return [(1, 3, 0.5), (2, 1, None)]

    calls = []
    cache = SimpleNamespace(prefetch=calls.append)
    blocks = [SimpleNamespace(layer=l, observers=[], recorders=[]) for l in (0, 1, 2)]
    pf = Prefetcher(SimpleNamespace(moe_blocks=blocks), cache, Offers())
    try:
        pf.routed_at = (1, 0)
        pf._handle(1, 0, [[2]], None)
        assert calls == [(1, 3), (2, 1)]
        calls.clear()
        pf.routed_at = (1, 1)  # the compute thread has routed layer 1 meanwhile
        pf._handle(1, 0, [[2]], None)
        assert calls == [(2, 1)]
    finally:
        pf.close()
