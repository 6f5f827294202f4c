"""The pure part of `edgemoe tune`: memory formula, cost model calibration, which settings are
confirmed, and the recommendation rule (no model runs)."""
from __future__ import annotations

import pytest

from edgemoe.simulate import SimResult
from edgemoe.tune.sweep import budget_grid
from edgemoe.tune.cost_model import (SLACK_BYTES, CostModel, MemoryPlan, Row, Setting, calibrate, calibrate_prefetch, recommend,
                                to_confirm)
from edgemoe.tune.runs import RunResult

MIB = 2**20


def _run(tps: float, bytes_per_token: float, misses: int = 0, tokens: int = 100) -> RunResult:
    return RunResult(tokens, tokens / tps, 0, misses, int(bytes_per_token * tokens), 0, 0, 0)


def _row(budget_mib: float, policy: str = "lru", prefetch: bool = False, tps: float = 0.0, measured=None,
         excluded: str = "", hits: int = 0) -> Row:
    b = int(budget_mib * MIB)
    row = Row(Setting(b, policy, prefetch), budget_mib / 100, SimResult(policy, b, hits, 100 - hits, 0, 10), b,
              predicted_tps=tps, excluded=excluded)
    if measured is not None:
        row.runs.append(_run(measured, 0))
    return row


def test_memory_plan():
    m = MemoryPlan(runtime_bytes=200 * MIB, dense_bytes=50 * MIB, kv_bytes=10 * MIB)
    slack = SLACK_BYTES // MIB
    assert m.need_bytes(100 * MIB) == (200 + 50 + 10 + slack + 100) * MIB
    assert m.max_budget(1000 * MIB) == (1000 - 260 - slack) * MIB
    assert "dense 50" in m.explain(100 * MIB)


def test_budget_grid_adds_the_cap_budget_and_drops_budgets_below_an_expert():
    budgets, excluded = budget_grid(1000, 100, (1.0, 0.5, 0.05), max_budget=640)
    assert budgets == [1000, 640, 500]
    assert list(excluded) == [50] and "largest expert" in excluded[50]


def test_calibration_recovers_a_linear_cost():
    base_s, read_s = 0.010, 1e-9  # 10 ms/token + 1 ns/byte
    full = _run(1 / (base_s + read_s * 1e6), 1e6)
    half = _run(1 / (base_s + read_s * 50e6), 50e6)
    model = calibrate(full, 0, warm_bps=2e9, cold_bps=0.5e9, ram_available=10**12, expert_total=10**9, other=half)
    assert model.read_source == "engine runs"
    assert model.base_s == pytest.approx(base_s) and model.warm_s_per_byte == pytest.approx(read_s)
    # the disk costs what the probe says on top of the engine's own per-byte cost
    assert model.cold_s_per_byte == pytest.approx(read_s + 1 / 0.5e9 - 1 / 2e9)
    sim = SimResult("lru", 0, 0, 0, int(20e6 * 10), 10)
    assert model.tokens_per_s(sim, 0) == pytest.approx(1 / (base_s + read_s * 20e6))


def test_calibration_falls_back_to_the_probe_on_noise():
    full, noisy = _run(100, 1e6), _run(101, 50e6)  # more bytes read, yet faster: noise
    model = calibrate(full, 0, 1e9, 0.0, 10**12, 10**9, other=noisy)
    assert model.read_source == "probe" and model.warm_s_per_byte == pytest.approx(1e-9)
    assert model.cold_s_per_byte == model.warm_s_per_byte  # disk speed unmeasured


def test_page_cache_share():
    m = CostModel(0.0, 1e-9, 5e-9, ram_available_bytes=1000, expert_bytes_total=400)
    assert m.read_s_per_byte(need_bytes=500) == pytest.approx(1e-9)        # all experts fit in the page cache
    assert m.read_s_per_byte(need_bytes=800) == pytest.approx(0.5e-9 + 2.5e-9)  # half of them
    assert m.read_s_per_byte(need_bytes=2000) == pytest.approx(5e-9)       # none


def test_prefetch_effect_and_factor():
    model = CostModel(0.010, 1e-9, 1e-9, 10**12, 10**9)
    demand_only = SimResult("lru", 0, 40, 60, int(60e6 * 10), 10)  # 60 MB/token read, 40% hits
    # with prefetch: 80% hits, 20 MB/token demand + 30 MB/token prefetched
    sim = SimResult("lru", 0, 80, 20, int(50e6 * 10), 10, prefetch_bytes=int(30e6 * 10))
    # measured: 60% hits (half the replay's gain), 10 misses of 1 MB = 10 MB demand per token,
    # 20 MB more by prefetch, each prefetched byte costing half a demand byte
    run = RunResult(100, 100 * (0.010 + 1e-9 * 10e6 + 0.5 * 1e-9 * 20e6), 1500, 1000, int(30e6 * 100), 0, 0, 0)
    fitted = calibrate_prefetch(model, run, sim, demand_only, 1e6, 0)
    assert fitted.prefetch_effect == pytest.approx(0.5) and fitted.prefetch_factor == pytest.approx(0.5)
    # predicted demand: 60 MB/token minus half of the 40 MB the replay saved
    want = 1 / (0.010 + 1e-9 * (60e6 - 0.5 * 40e6) + 0.5 * 1e-9 * 30e6)
    assert fitted.tokens_per_s(sim, 0, demand_only) == pytest.approx(want)
    nothing = RunResult(100, 2.0, 1500, 1000, int(10e6 * 100), 0, 0, 0)  # read only its misses
    assert calibrate_prefetch(model, nothing, sim, demand_only, 1e6, 0) is model


def test_recommend_prefers_less_memory_within_tolerance():
    rows = [_row(100, tps=100), _row(75, tps=97), _row(50, tps=90), _row(25, tps=99, excluded="over the cap")]
    speed = lambda r: r.predicted_tps  # noqa: E731
    assert recommend(rows, speed, 0.05).setting.budget_bytes == 75 * MIB
    assert recommend(rows, speed, 0.0).setting.budget_bytes == 100 * MIB
    assert recommend([rows[-1]], speed, 0.05) is None


def test_to_confirm_skips_settings_with_identical_outcomes():
    rows = [_row(100, p, tps=50, hits=100) for p in ("lru", "lfu", "hybrid", "random")]  # all fit: same outcome
    rows += [_row(50, "lru", tps=40, hits=60), _row(50, "lfu", tps=45, hits=70), _row(25, "lfu", tps=30, hits=40)]
    picked = to_confirm(rows, 3, 0.05)
    assert [(r.setting.budget_bytes // MIB, r.setting.policy) for r in picked] == [(100, "lru"), (50, "lfu"),
                                                                                  (50, "lru")]
    assert len(to_confirm(rows, -1, 0.05)) == 4  # every distinct eligible outcome
    # the predicted recommendation is always confirmed, even when others rank above it
    rows.append(_row(10, "lfu", tps=49.5, hits=20))
    assert to_confirm(rows, 1, 0.05)[0].setting.budget_bytes == 10 * MIB
