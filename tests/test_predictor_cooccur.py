"""The cross-layer co-occurrence predictor: counted online, no file, no router logits. Exact on
routing where each layer follows from the one before; on real routing (Qwen3-30B-A3B) well above
the frequency prior; and the replay's demand misses with it as prefetcher."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgemoe.bench.predictor_compare import compare_predictors, schedule
from edgemoe.predictor.base import DEFAULT_PREDICTOR, Predictor, RoutingShape, make_predictor
from edgemoe.trace import Trace
from predictor_traces import synthetic_trace

QWEN = Path(__file__).parent / "data" / "qwen3-30b-a3b.trace.json"


class _TopK(Predictor):
    """Offers only the predictor's top-k (no probabilities): its ranking alone, scored."""

    def __init__(self, inner: Predictor):
        self.inner, self.shape = inner, inner.shape

    def observe(self, index, ids):
        self.inner.observe(index, ids)

    def predict(self, q):
        return self.inner.predict(q)


def _precision(trace: Trace, name: str, offered: bool = False) -> float:
    """Of the top-k, or (offered) of everything the predictor offers the cache."""
    predictor = make_predictor(name, RoutingShape.of_trace(trace))
    sched = schedule(trace, predictor if offered else _TopK(predictor))
    return sched.correct / sched.predicted


def test_learns_a_layer_to_layer_map():
    """Layer l+1 = (e + 1) mod E of layer l's experts (the prior knows nothing: 33%). Naive Bayes
    over both chosen experts is not exact here (each true expert is explained by one of them and
    the other's pairing is random), 0.80 where an exact model would be ~0.94; on real routing it
    beat the alternatives tried (docs/BENCHMARKS.md)."""
    trace = synthetic_trace(n_prompts=4, n_decode=40, logits=False)
    assert not make_predictor("cooccur", RoutingShape.of_trace(trace)).needs_logits
    assert round(_precision(trace, "cooccur"), 4) == 0.7984
    assert _precision(trace, "prior") < 0.34


def test_real_routing_has_signal_beyond_popularity():
    trace = Trace.load(QWEN)
    cooccur, prior = _precision(trace, "cooccur"), _precision(trace, "prior")
    assert round(cooccur, 4) == 0.5888 and round(prior, 4) == 0.3456  # deterministic replay
    assert DEFAULT_PREDICTOR == "cooccur"


def test_prefetch_demand_misses_against_belady():
    """The default prefetch on real routing at a 10% budget (the trace's first 64 decode steps):
    fewer demand misses than without prefetch, within 1.5x Belady's demand-only misses."""
    trace = Trace.load(QWEN).sliced(0, 65)
    budget = sum(trace.expert_bytes.values()) // 10
    rows = {r.predictor: r for r in compare_predictors(trace, budget, predictors=("none", "cooccur"))}
    assert rows["cooccur"].misses < rows["none"].misses
    assert rows["cooccur"].misses <= 1.5 * rows["cooccur"].belady_misses
    assert rows["cooccur"].wasted_bytes_per_token > 0


# demand misses on the whole trace (128 decode steps), split policy; docs/BENCHMARKS.md (#17)
PREFETCH_MISSES = {0.10: (6491, 9061), 0.25: (3391, 2469)}  # (cooccur, belady demand-only)


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.10, 0.25])
def test_default_prefetch_within_one_and_a_half_belady(share):
    """Issue #17's target: with the default prefetch, demand misses at most 1.5x Belady's
    demand-only misses at 10% and 25% (without prefetch: 1.78x and 2.47x)."""
    trace = Trace.load(QWEN)
    budget = int(sum(trace.expert_bytes.values()) * share)
    rows = {r.predictor: r for r in compare_predictors(trace, budget, predictors=("none", "cooccur"))}
    got = rows["cooccur"]
    assert (got.misses, got.belady_misses) == PREFETCH_MISSES[share]
    assert got.misses <= 1.5 * got.belady_misses < rows["none"].misses
