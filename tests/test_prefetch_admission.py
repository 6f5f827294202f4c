"""Prefetch admission (`Residency.room_for_prefetch`, used by ExpertCache.prefetch and the
replay): a prefetch its layer routed past unused is evicted first, prefetches still waiting for
their layer are never evicted by another prefetch, and a guess with a probability is refused when
what it would evict is worth more per byte; `cooccur`'s probabilities are calibrated on real
routing (predicted vs observed frequency)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.demo import demo_gguf
from edgemoe.expert_cache import ExpertCache
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.policies import LayerSplit, make_policy
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


def _split_with_a_valuable_expert() -> tuple[Residency, LayerSplit]:
    """Layer 0 routes expert 0 on every one of 10 steps (layer 1 expert 0 between): its slot
    hit 9 times in 10 steps."""
    policy = LayerSplit()
    state = Residency(SIZES, 2000, policy)
    for _ in range(10):
        for key in ((0, 0), (1, 0)):
            _route(state, key)
    return state, policy


def test_a_guess_is_weighed_against_its_victim():
    state, policy = _split_with_a_valuable_expert()
    victim = policy.choose(state.resident, lambda k: True, state.clock)
    worth = policy.value(victim) * state.sizes[victim]  # hits per step its slot buys
    assert 0.8 < worth < 1.0
    assert not state.room_for_prefetch((0, 1), probability=worth - 0.05)
    assert state.resident == {(0, 0), (1, 0)}  # refused: nothing evicted
    assert state.room_for_prefetch((0, 1), probability=worth + 0.05)
    assert victim not in state.resident
    state, _ = _split_with_a_valuable_expert()
    assert state.room_for_prefetch((0, 1))  # no probability: admitted whenever room can be made
    assert make_policy("lru").value((0, 0)) is None  # a policy without a price admits every guess


def test_expert_cache_prefetch_admits_as_the_replay():
    """The engine's and the budgeted llama.cpp mode's prefetch path is the same rule."""
    path = demo_gguf()
    specs = stock_experts(GGUFFile(path))
    size = max(s.alloc_bytes for s in specs.values())
    cache = ExpertCache(path, specs, 2 * size, LayerSplit(), 1 + max(k[0] for k in specs))
    try:
        for _ in range(10):
            for key in ((0, 0), (1, 0)):
                cache.acquire_many([key])
                cache.release(key)
        assert not cache.prefetch((0, 1), 0.5)
        assert cache.resident == {(0, 0), (1, 0)}
        assert cache.prefetch((0, 1), 0.99)
        assert (0, 1) in cache.resident and len(cache.resident) == 2
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
    token and hold room); the rest go to the cache with their probabilities, in order."""
    from types import SimpleNamespace

    from edgemoe.predictor.base import Predictor
    from edgemoe.prefetch import Prefetcher

    class Offers(Predictor):  # fixed offers: this test is about the prefetcher, not a predictor
        shape = RoutingShape("m", (0, 1, 2), 4, 1)

        def candidates(self, q):
            return [(1, 3, 0.5), (2, 1, None)]

    calls = []
    cache = SimpleNamespace(prefetch=lambda key, p: calls.append((key, p)))
    blocks = [SimpleNamespace(layer=l, observers=[], recorders=[]) for l in (0, 1, 2)]
    pf = Prefetcher(SimpleNamespace(moe_blocks=blocks), cache, Offers())
    try:
        pf.routed_at = (1, 0)
        pf._handle(1, 0, [[2]], None)
        assert calls == [((1, 3), 0.5), ((2, 1), None)]
        calls.clear()
        pf.routed_at = (1, 1)  # the compute thread has routed layer 1 meanwhile
        pf._handle(1, 0, [[2]], None)
        assert calls == [((2, 1), None)]
    finally:
        pf.close()
