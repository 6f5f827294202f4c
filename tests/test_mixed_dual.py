"""Dual precision: resident low-bit copies of every expert, outside the budget, serve cache misses
(low-gate ones by default; every one, with the full copy loading behind, on request); the
budget still holds; counts say how often."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.converters.convert import convert
from edgemoe.demo import demo_gguf
from edgemoe.engine import Engine, EngineConfig
from edgemoe.bench.quality import QualitySums, heldout_windows

N_MOE_LAYERS, TOP_K = 4, 2  # the demo model
BEHIND = dict(dual_low_type="q2_k", dual_load_above=1.0, dual_background_load=True)  # every miss low, load behind
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_q8():
    return demo_gguf("q8_0")


@pytest.fixture(scope="module")
def window(demo_q8):
    engine = Engine(demo_q8, EngineConfig(n_threads=1))
    try:
        return heldout_windows(engine.tokenizer, window=64, max_windows=1)[0]
    finally:
        engine.close()


def _engine(path, share: float | None = None, **kw) -> Engine:
    probe = Engine(path, EngineConfig(n_threads=1))
    total = probe.expert_bytes_total
    probe.close()
    budget = None if share is None else int(total * share)
    return Engine(path, EngineConfig(budget_bytes=budget, n_threads=1, **kw))


def test_low_copies_are_measured_outside_the_budget_and_serve_misses(demo_q8, window):
    full = _engine(demo_q8)
    ref = full.logits(window)
    full.close()
    engine = _engine(demo_q8, 0.25, **BEHIND)
    try:
        low = engine.cache.low
        assert engine.low_bytes == sum(ex.buffer.nbytes for ex in low.experts.values()) > 0
        # q2_k is 2.625 bits per weight against q8_0's 8.5
        assert engine.low_bytes < 0.35 * sum(s.nbytes for s in engine.specs.values())
        got = engine.logits(window)
        cold = engine.cache.step_stats()  # nothing resident yet: every expert is served low
        engine.cache.drain()
        events = list(engine.stream_generate(window[:16], max_tokens=24, stop_at_eos=False))
        budget = engine.cache.budget_bytes
        assert engine.cache.state.peak_bytes <= budget  # resident + in flight, low copies not counted
    finally:
        engine.close()
    assert cold.low_resident_bytes == engine.low_bytes
    assert cold.token_slots == cold.low_token_slots == len(window) * TOP_K * N_MOE_LAYERS
    assert cold.low_served == cold.misses > 0 and cold.hits == 0
    assert all(e.cache.resident_bytes <= budget for e in events)
    decode = events[1:]  # one token per step: 2 experts per layer, some resident, some not
    assert all(e.cache.token_slots == TOP_K * N_MOE_LAYERS for e in decode)
    low_slots = sum(e.cache.low_token_slots for e in decode)
    assert 0 < low_slots < sum(e.cache.token_slots for e in decode)
    assert sum(e.cache.hits for e in decode) > 0
    assert all(e.cache.low_served <= e.cache.misses for e in decode)
    # the cold pass ran every expert at q2_k: still close to the full-precision model
    q = QualitySums.of_window(window, got, ref)
    kl, top1 = q.mean_kl, q.top1_share
    print(f"cold dual pass vs full precision: KL {kl:.4f} nats/token, top-1 {top1:.3f}")
    assert kl < 0.05 and top1 >= 0.85


def test_full_budget_serves_nothing_low_once_warm(demo_q8, window):
    engine = _engine(demo_q8, None, **BEHIND)
    try:
        misses = []
        for _ in range(6):  # each pass's low-served misses load in the background (stale ones are dropped)
            engine.logits(window[:16])
            misses.append(engine.cache.step_stats().misses)
            engine.cache.drain()
        for _ in engine.stream_generate(window[:16], max_tokens=8, stop_at_eos=False):
            pass
        warm = engine.cache.step_stats()
    finally:
        engine.close()
    assert misses[0] > 0 and misses[-1] == 0, misses
    assert warm.low_served == 0 and warm.low_token_slots == 0 and warm.misses == 0


def test_threshold_zero_waits_for_every_miss_and_changes_nothing(demo_q8, window):
    plain = _engine(demo_q8, 0.25)
    want = plain.logits(window)
    plain.close()
    engine = _engine(demo_q8, 0.25, **{**BEHIND, "dual_load_above": 0.0})
    try:
        got = engine.logits(window)
        stats = engine.cache.step_stats()
    finally:
        engine.close()
    assert stats.low_served == 0 and stats.misses > 0
    np.testing.assert_array_equal(got, want)


def test_default_loads_high_gate_misses_and_serves_the_rest_low_without_loading(demo_q8, window):
    engine = _engine(demo_q8, 0.25, dual_low_type="q2_k")  # defaults: gate > 0.5 loads, nothing behind
    try:
        assert engine.cache.load_above == 0.5 and not engine.cache.background_load
        stats = [e.cache for e in engine.stream_generate(window[:16], max_tokens=24, stop_at_eos=False)][1:]
        engine.cache.load_above = 1.0  # now no miss may load
        after = [e.cache for e in engine.stream_generate(window[16:32], max_tokens=4, stop_at_eos=False)]
    finally:
        engine.close()
    # with top-2 routing the first expert's gate is >= 0.5: per token at most one expert per layer low
    assert all(s.low_token_slots <= N_MOE_LAYERS for s in stats)
    assert sum(s.low_served for s in stats) > 0 and sum(s.bytes_read for s in stats) > 0
    assert sum(s.bytes_read for s in after) == 0
    assert sum(s.low_served for s in after) == sum(s.misses for s in after) > 0


def test_experts_already_at_the_low_type_are_exact_and_never_load(tmp_path, window):
    from edgemoe.models import demo_dir

    path = convert(demo_dir(), tmp_path / "demo-q2_k.gguf", "q2_k").path
    engine = _engine(path, 0.25, dual_low_type="q2_k")
    try:
        assert engine.cache.low.exact == set(engine.specs)
        engine.logits(window)
        stats = engine.cache.step_stats()
    finally:
        engine.close()
    assert stats.low_served == 0 and stats.misses == 0 and stats.bytes_read == 0
    assert stats.hits > 0


def test_unknown_low_type_is_refused(demo_q8):
    with pytest.raises(ValueError, match="low type 'q9_k'"):
        Engine(demo_q8, EngineConfig(dual_low_type="q9_k"))
