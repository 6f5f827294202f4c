"""Bit allocation (multiple-choice knapsack) and the inputs it refuses: budgets below every
expert at q2_k, calibration text that is missing, empty, unreadable or too short."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from edgemoe.converters.allocation import AllocationError, Option, allocate, minimum_bytes
from edgemoe.converters.calib_text import MIN_CALIBRATION_TOKENS, CalibrationError, calibration_text, check_enough
from edgemoe.converters.extended import ExpertSource
from edgemoe.converters.calibration import CANDIDATE_TYPES, Calibration, ExpertStats
from edgemoe.converters.errors import ConvertError
from edgemoe.converters.mixed import (allocate_types, expert_budget, experts_bytes, layer_options,
                                      parse_candidate_types)


def _instance(rng, n_items: int, n_opts: int) -> dict:
    options = {}
    for i in range(n_items):
        sizes = np.sort(rng.choice(np.arange(2, 40), n_opts, replace=False)) * 8
        costs = np.sort(rng.random(n_opts) * rng.random() * 10)[::-1]  # more bytes, less error
        if rng.random() < 0.3:
            costs = rng.random(n_opts)  # non-monotone: dominated options must be handled
        options[i] = [Option(j, int(s), float(c)) for j, (s, c) in enumerate(zip(sizes, costs))]
    return options


def _brute_force(options: dict, budget: int) -> float:
    best = np.inf
    for combo in itertools.product(*options.values()):
        if sum(o.nbytes for o in combo) <= budget:
            best = min(best, sum(o.cost for o in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_exact_is_optimal_and_greedy_gap_bounds_it(seed):
    rng = np.random.default_rng(seed)
    options = _instance(rng, n_items=5, n_opts=4)
    low, high = minimum_bytes(options), sum(max(o.nbytes for o in v) for v in options.values())
    budget = int(rng.integers(low, high + 1))
    optimum = _brute_force(options, budget)
    exact = allocate(options, budget, exact=True)
    assert exact.method == "exact" and exact.total_bytes <= budget
    assert exact.objective == pytest.approx(optimum) and exact.gap == pytest.approx(0.0, abs=1e-9)
    greedy = allocate(options, budget, exact=False)
    assert greedy.method == "greedy" and greedy.total_bytes <= budget
    assert greedy.lower_bound <= optimum + 1e-9 <= greedy.objective + 2e-9
    assert greedy.objective - optimum <= greedy.gap + 1e-9  # the stated gap really bounds the loss


def test_budget_at_the_extremes():
    options = _instance(np.random.default_rng(0), n_items=6, n_opts=3)
    low = minimum_bytes(options)
    at_min = allocate(options, low)
    assert at_min.total_bytes == low  # only the smallest option of every item fits
    assert all(at_min.choice[i] == min(opts, key=lambda o: o.nbytes).label for i, opts in options.items())
    rich = allocate(options, 10**9)
    assert rich.objective == pytest.approx(sum(min(o.cost for o in opts) for opts in options.values()))
    with pytest.raises(AllocationError, match=f"minimum {low:,} bytes"):
        allocate(options, low - 1)


def _experts(n: int = 4, rows: int = 512, cols: int = 256) -> dict:
    shapes = {"gate": (rows, cols), "up": (rows, cols), "down": (cols, rows)}
    return {(0, e): ExpertSource(0, e, {}, shapes) for e in range(n)}


def test_expert_budget_from_bytes_or_bits_and_the_minimum_it_names():
    experts = _experts()
    n_params = 4 * 3 * 512 * 256
    q2 = experts_bytes(experts, QT.Q2_K)
    assert q2 == n_params * 84 // 256  # q2_k: 84 bytes per 256 weights = 2.625 bits
    assert expert_budget(experts, avg_bits=3.5) == int(3.5 * n_params / 8)
    assert expert_budget(experts, expert_bytes="1MiB") == 2**20
    with pytest.raises(AllocationError) as err:
        expert_budget(experts, avg_bits=2.0)
    msg = str(err.value)
    assert f"minimum {q2:,} bytes" in msg and "q2_k" in msg and "--avg-bits to at least 2.625" in msg
    with pytest.raises(AllocationError, match=f"--expert-bytes to at least {q2}"):
        expert_budget(experts, expert_bytes=q2 - 1)
    with pytest.raises(Exception, match="exactly one"):
        expert_budget(experts, expert_bytes="1MiB", avg_bits=3.0)


def test_fallback_rows_are_costed_at_the_type_actually_written():
    experts = _experts(n=1, rows=384, cols=384)  # 384 is no multiple of K-quants' 256-value blocks
    src = experts[(0, 0)]
    assert src.types(QT.Q2_K) == (QT.Q4_0, QT.Q4_0, QT.Q4_0)
    assert experts_bytes(experts, QT.Q2_K) == 3 * 384 * 384 * 18 // 32


def _layered(n_layers: int = 4, n_experts: int = 3, seed: int = 0) -> tuple[dict, Calibration]:
    """Experts over several layers, each with its own importance, and errors per type."""
    rng = np.random.default_rng(seed)
    shapes = {"gate": (512, 256), "up": (512, 256), "down": (256, 512)}
    experts = {(layer, e): ExpertSource(layer, e, {}, shapes) for layer in range(n_layers) for e in range(n_experts)}
    errors = {QT.Q2_K: 0.1, QT.Q3_K: 0.04, QT.Q4_K: 0.015, QT.Q5_K: 0.006, QT.Q6_K: 0.003, QT.Q8_0: 0.001}
    stats = {key: ExpertStats(*key, src.n_params, importance=float(rng.random() * (1 + key[0])), rel_error=dict(errors))
             for key, src in experts.items()}
    return experts, Calibration("test", 0, CANDIDATE_TYPES, stats)


def test_per_layer_allocation_gives_each_layer_one_type_and_is_optimal_among_them():
    experts, calib = _layered()
    types = (QT.Q2_K, QT.Q4_K)
    budget = expert_budget(experts, avg_bits=3.4375, types=types)
    got = allocate_types(experts, calib, budget, per="layer", types=types)
    assert got.total_bytes <= budget and got.method == "exact, per layer"
    assert set(got.choice) == set(experts)
    by_layer = {layer: {got.choice[(layer, e)] for e in range(3)} for layer in range(4)}
    assert all(len(chosen) == 1 for chosen in by_layer.values())
    assert {t for (t,) in by_layer.values()} == set(types)  # 3.4375 bits: some layers at each type
    # no other one-type-per-layer choice within the budget has less expected error
    best = np.inf
    for combo in itertools.product(types, repeat=4):
        keys = [(k, t) for k in experts for t in [combo[k[0]]]]
        if sum(experts[k].nbytes(experts[k].types(t)) for k, t in keys) <= budget:
            best = min(best, sum(calib.experts[k].cost(t) for k, t in keys))
    assert got.objective == pytest.approx(best)
    # per expert the same budget buys no more error than per layer (a finer choice)
    assert allocate_types(experts, calib, budget, per="expert", types=types).objective <= got.objective + 1e-12
    options = layer_options(experts, calib, types)
    assert [o.label for o in options[0]] == list(types)
    assert options[0][1].nbytes == sum(experts[(0, e)].nbytes(experts[(0, e)].types(QT.Q4_K)) for e in range(3))
    with pytest.raises(ConvertError, match="unknown granularity"):
        allocate_types(experts, calib, budget, per="row")


def test_candidate_types_by_name_or_what_this_cpu_repacks():
    from edgemoe.native import repack

    assert parse_candidate_types(None) == CANDIDATE_TYPES
    assert parse_candidate_types(" Q4_K,q2_k,q4_k ") == (QT.Q2_K, QT.Q4_K)
    assert parse_candidate_types("repacked") == tuple(t for t in CANDIDATE_TYPES if repack.repacks_type(int(t)))
    assert QT.Q4_K in parse_candidate_types("repacked")  # AVX2 and AVX-512 both repack q4_k
    with pytest.raises(ConvertError, match="unknown expert type 'q4_1'.*repacked"):
        parse_candidate_types("q4_k,q4_1")
    experts, calib = _layered()
    narrow = Calibration("test", 0, (QT.Q4_K,), calib.experts)
    with pytest.raises(ConvertError, match="measured no errors for q2_k"):
        allocate_types(experts, narrow, 10**9, types=(QT.Q2_K, QT.Q4_K))


def test_calibration_text_sources_and_errors(tmp_path):
    txt = tmp_path / "cal.txt"
    txt.write_text("def f(x):\n    return x\n")
    assert calibration_text(txt).documents == ["def f(x):\n    return x\n"]
    jl = tmp_path / "cal.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps("two") + "\n")
    assert calibration_text(jl).documents == ["one", "two"]
    assert calibration_text(None).documents  # the demo corpus's train split

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match=f"no text.*at least {MIN_CALIBRATION_TOKENS} tokens"):
        calibration_text(empty)
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_text(tmp_path / "missing.txt")
    with pytest.raises(CalibrationError, match="is a folder"):
        calibration_text(tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\x81\xff\x00" * 10)
    with pytest.raises(CalibrationError, match="not UTF-8"):
        calibration_text(binary)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CalibrationError, match="line 2 is not JSON"):
        calibration_text(bad)
    with pytest.raises(CalibrationError, match=f"at least {MIN_CALIBRATION_TOKENS}"):
        check_enough(10, str(txt))
