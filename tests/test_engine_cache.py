"""The expert cache never changes the math and never exceeds its budget (Mixtral layout)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgemoe.converters.convert import convert
from edgemoe.engine import Engine, EngineConfig
from edgemoe.gguf_file import ModelFileError
from edgemoe.residency import BudgetError
from edgemoe.simulate import simulate
from edgemoe.trace import Trace, TraceRecorder
from synthetic import write_mixtral

PROMPT = "def f(x):\n    return x + 1\nThe quick brown fox"


@pytest.fixture(scope="module")
def model_q8(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    ckpt = write_mixtral(d / "ckpt", hidden=256, ff=256, n_experts=8, n_layers=3, seed=1)
    return convert(ckpt, d / "m.gguf", "q8_0").path


def _budget(engine, share):
    largest = max(s.alloc_bytes for s in engine.specs.values())
    return max(int(engine.expert_bytes_total * share), largest)


def _run(path, config, n=16):
    engine = Engine(path, config)
    try:
        events = list(engine.stream_generate(PROMPT, max_tokens=n, stop_at_eos=False))
        return engine, events
    finally:
        engine.close()


def test_tokens_identical_at_every_budget_policy_and_prefetch(model_q8):
    ref_engine, ref = _run(model_q8, EngineConfig())
    ref_tokens = [e.token for e in ref]
    for share in (0.75, 0.5, 0.25):
        for policy in ("lru", "lfu", "hybrid", "random", "split"):
            for prefetch in (False, True):
                budget = _budget(ref_engine, share)
                engine, events = _run(model_q8, EngineConfig(budget_bytes=budget, policy=policy, prefetch=prefetch))
                assert [e.token for e in events] == ref_tokens, (share, policy, prefetch)
                for e in events:  # the hard limit, on every step
                    assert e.cache.resident_bytes <= budget
                assert engine.cache.state.peak_bytes <= budget  # includes loads in flight


def test_logits_exactly_equal_under_tight_budget(model_q8):
    full = Engine(model_q8)
    ids = full.tokenizer.encode(PROMPT)
    want = full.logits(ids)
    tight = Engine(model_q8, EngineConfig(budget_bytes=_budget(full, 0.2), policy="lru"))
    got = tight.logits(ids)
    assert tight.cache.step_stats().misses > 0
    np.testing.assert_array_equal(got, want)
    full.close(), tight.close()


def test_simulator_replays_the_engine_exactly(model_q8, tmp_path):
    """Hit/miss counts of `simulate` on a recorded trace equal what the engine measured."""
    probe = Engine(model_q8)
    budget = _budget(probe, 0.4)
    probe.close()
    for policy in ("lru", "lfu", "hybrid", "split"):
        engine = Engine(model_q8, EngineConfig(budget_bytes=budget, policy=policy))
        rec = TraceRecorder(engine)
        events = list(engine.stream_generate(PROMPT, max_tokens=20, stop_at_eos=False))
        trace = rec.detach()
        engine.close()
        trace.save(tmp_path / "t.json")
        sim = simulate(Trace.load(tmp_path / "t.json"), budget, policy, decode_only=False)
        assert sim.hits == sum(e.cache.hits for e in events), policy
        assert sim.misses == sum(e.cache.misses for e in events), policy


def test_belady_is_a_lower_bound_on_misses(model_q8):
    engine = Engine(model_q8)
    rec = TraceRecorder(engine)
    list(engine.stream_generate(PROMPT, max_tokens=30, stop_at_eos=False))
    trace = rec.detach()
    budget = _budget(engine, 0.3)
    engine.close()
    best = simulate(trace, budget, "belady").misses
    for policy in ("lru", "lfu", "hybrid", "random", "split"):
        assert simulate(trace, budget, policy).misses >= best
    # and the engine runs Belady for real with the same future
    eng = Engine(model_q8, EngineConfig(budget_bytes=budget, policy="belady", future=tuple(trace.demand_sequence())))
    events = list(eng.stream_generate(PROMPT, max_tokens=30, stop_at_eos=False))
    assert sum(e.cache.misses for e in events) == simulate(trace, budget, "belady", decode_only=False).misses
    eng.close()


def test_budget_below_largest_expert(model_q8):
    probe = Engine(model_q8)
    largest = max(s.alloc_bytes for s in probe.specs.values())
    probe.close()
    with pytest.raises(BudgetError, match="below the largest expert"):
        Engine(model_q8, EngineConfig(budget_bytes=largest - 1))


def test_unknown_policy(model_q8):
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        Engine(model_q8, EngineConfig(policy="fifo"))


def test_missing_and_truncated_model(model_q8, tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Engine(tmp_path / "none.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_q8.read_bytes()[: model_q8.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        Engine(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelFileError):
        Engine(junk)


def test_cli_errors_are_one_line(model_q8, tmp_path):
    for argv, needle in [(["generate", str(model_q8), "--budget", "1KB"], "below the largest expert"),
                         (["generate", str(model_q8), "--policy", "fifo"], "unknown cache policy"),
                         (["generate", str(tmp_path / "x.gguf")], "does not exist"),
                         (["generate", str(model_q8), "--policy", "belady"], "needs --trace")]:
        done = subprocess.run([sys.executable, "-m", "edgemoe.cli", *argv], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr and "Traceback" not in done.stderr


def test_open_reports_the_experts_it_loads(model_q8):
    """A budget that holds every expert loads them at open and says so, layer by layer (the CLI's
    progress bar): bytes rising to every expert's file bytes; a smaller budget loads nothing then."""
    seen = []
    engine = Engine(model_q8, EngineConfig(), on_progress=lambda done, total: seen.append((done, total)))
    try:
        total = sum(s.nbytes for s in engine.specs.values())
        assert len(seen) == len({layer for layer, _ in engine.specs})
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (total, total)
        assert {t for _, t in seen} == {total}
        budget = _budget(engine, 0.5)
    finally:
        engine.close()
    seen.clear()
    Engine(model_q8, EngineConfig(budget_bytes=budget), on_progress=lambda *a: seen.append(a)).close()
    assert seen == []
