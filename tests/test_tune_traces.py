"""`edgemoe tune --traces`: more traces of the model replayed beside the recorded one, each
setting's replay the sum over them and each trace's hit rate kept; another model's trace refused.
Pure replay (no model runs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgemoe.simulate import simulate
from edgemoe.trace import TraceError
from edgemoe.tune.sweep import TuneOptions, TuneResult, _more_traces, _replay
from predictor_traces import synthetic_trace


def test_replay_sums_the_traces_and_keeps_each_hit_rate(tmp_path):
    for seed in (0, 1):
        synthetic_trace(n_prompts=2, n_decode=16, seed=seed, logits=False).save(tmp_path / f"t{seed}.json")
    first = synthetic_trace(n_prompts=1, n_decode=16, seed=2, logits=False)
    traces = [(Path("recorded.json"), first)] + _more_traces(tmp_path, first.expert_bytes)
    res = TuneResult(TuneOptions(Path("m.gguf")))
    budget = sum(first.expert_bytes.values()) // 2
    sim = _replay(res, traces, budget, "split", None)
    each = [simulate(t, budget, "split") for _, t in traces]
    assert (sim.hits, sim.misses, sim.tokens) == (sum(s.hits for s in each), sum(s.misses for s in each),
                                                  sum(s.tokens for s in each))
    assert set(res.trace_hit_rates) == {"recorded.json", "t0.json", "t1.json"}
    label = f"{budget / 2**20:.1f} MiB split"
    assert [res.trace_hit_rates[p.name][label] for p, _ in traces] == [s.hit_rate for s in each]


def test_traces_of_another_model_are_refused(tmp_path):
    synthetic_trace(n_prompts=1, n_decode=4, n_experts=16, logits=False).save(tmp_path / "other.json")
    mine = synthetic_trace(n_prompts=1, n_decode=4, logits=False)
    with pytest.raises(TraceError, match="routing of another model"):
        _more_traces(tmp_path, mine.expert_bytes)
    assert _more_traces(None, mine.expert_bytes) == []
