"""`edgemoe tune` on the Mixtral-shaped slice (true Mixtral dims, 2 layers, Q4_K, 1.7 GB): the
replay against real runs with ~99 MB experts, under a cap that excludes the full budget."""
from __future__ import annotations

import pytest

from edgemoe.tune.sweep import TuneOptions, tune
from edgemoe.tune.cost_model import MemoryPlan
from edgemoe.tune.runs import run_facts
from test_tune import PREFETCH_HIT_ABOVE, PREFETCH_HIT_MARGIN


@pytest.fixture(scope="module")
def mixtral_slice():
    from edgemoe.models.cache import cache_dir
    from edgemoe.models.mixtral_slice import write_mixtral_slice

    path = cache_dir("bench") / "mixtral-slice-2L-q4_k.gguf"  # shared with `edgemoe bench`
    if not path.exists():
        write_mixtral_slice(path, 2, "q4_k")
    return path


@pytest.mark.slow
def test_tune_on_the_mixtral_slice(mixtral_slice, tmp_path):
    facts = run_facts(str(mixtral_slice), 512)
    plan = MemoryPlan(facts.runtime_bytes, facts.dense_bytes, facts.kv_bytes)
    total = sum(facts.expert_bytes.values())
    cap = plan.need_bytes(int(total * 0.6))
    res = tune(TuneOptions(mixtral_slice, n_tokens=4, shares=(1.0, 0.5, 0.25), confirm=1, repeats=1,
                           max_memory_bytes=cap, work_dir=tmp_path))
    assert total in res.excluded_budgets and int(total * 0.5) not in res.excluded_budgets
    assert res.recommended_by == "measured" and not res.recommended.excluded
    assert not [n for n in res.notes if "differ" in n]  # every run followed the trace's routing
    for row in res.measured_rows():
        assert row.measured_peak_bytes <= res.cap_bytes, row.setting
        if not row.setting.prefetch:
            assert row.measured_hit_rate == pytest.approx(row.sim.hit_rate, abs=1e-9), row.setting
        else:
            assert row.measured_hit_rate - row.sim.hit_rate <= PREFETCH_HIT_ABOVE, row.setting
            if row.share >= 0.5:
                assert abs(row.measured_hit_rate - row.sim.hit_rate) <= PREFETCH_HIT_MARGIN, row.setting
