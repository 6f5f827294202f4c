"""`edgemoe simulate` over a folder of traces: each trace, then the sum over them (overall); the
same for --compare-predictors; clear errors for an empty folder."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from edgemoe.bench.predictor_compare import combine, compare_predictors
from edgemoe.simulate import simulate, total
from edgemoe.trace import TraceError, load_traces
from predictor_traces import synthetic_trace


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    for seed in (0, 1):
        synthetic_trace(n_prompts=2, n_decode=20, seed=seed, logits=False).save(d / f"t{seed}.json")
    return d


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]


def test_folder_reports_each_trace_and_the_sum(folder):
    done = subprocess.run([sys.executable, "-m", "edgemoe.cli", "simulate", str(folder), "--budget", "50%",
                           "--policy", "lru", "--policy", "split"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = _rows(done.stdout)
    misses = {(r[0], r[3]): int(r[5]) for r in rows}
    assert {name for name, _ in misses} == {"t0.json", "t1.json", "overall"}
    for policy in ("lru", "split", "belady"):
        assert misses[("overall", policy)] == misses[("t0.json", policy)] + misses[("t1.json", policy)]
    traces = [t for _, t in load_traces(folder)]
    budget = sum(traces[0].expert_bytes.values()) // 2
    assert misses[("t0.json", "split")] == simulate(traces[0], budget, "split").misses


def test_sum_of_results_and_of_predictor_rows(folder):
    traces = [t for _, t in load_traces(folder)]
    budget = sum(traces[0].expert_bytes.values()) // 2
    sims = [simulate(t, budget, "lru") for t in traces]
    both = total(sims)
    assert (both.hits, both.misses, both.tokens) == tuple(sum(getattr(s, f) for s in sims)
                                                          for f in ("hits", "misses", "tokens"))
    rows = [compare_predictors(t, budget, predictors=("cooccur",)) for t in traces]
    c = combine([r[0] for r in rows])
    assert c.precision == pytest.approx(sum(r[0].correct for r in rows) / sum(r[0].predicted for r in rows))
    assert c.hit_rate == pytest.approx(sum(r[0].hits for r in rows) / sum(r[0].hits + r[0].misses for r in rows))
    assert c.belady_hit_rate == pytest.approx(1 - sum(r[0].belady_misses for r in rows)
                                              / sum(r[0].hits + r[0].misses for r in rows))


def test_compare_predictors_on_a_folder_prints_overall(folder):
    done = subprocess.run([sys.executable, "-m", "edgemoe.cli", "simulate", str(folder), "--compare-predictors",
                           "--budget", "50%"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "overall: counts summed over the traces" in done.stdout
    assert re.search(r"router: the trace has no router_logits", done.stdout)


def test_empty_folder_is_one_clear_error(tmp_path):
    with pytest.raises(TraceError, match="holds no trace files"):
        load_traces(tmp_path)
    done = subprocess.run([sys.executable, "-m", "edgemoe.cli", "simulate", str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "holds no trace files" in done.stderr and "Traceback" not in done.stderr
