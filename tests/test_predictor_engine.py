"""The prefetcher with each predictor in the engine: identical tokens (prefetching never changes
the math), the budget holds, the learned predictor runs, and a bad predictor file never stops
generation."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgemoe.converters.convert import convert
from edgemoe.engine import Engine, EngineConfig
from edgemoe.predictor.base import Predictor, PriorPredictor, RouterPredictor
from edgemoe.predictor.cooccur import CooccurPredictor
from edgemoe.predictor.onnx_runtime import LearnedPredictor, beside_path
from edgemoe.predictor.train import train
from edgemoe.trace import TraceRecorder
from synthetic import write_mixtral

PROMPTS = ["def f(x):\n    return x + 1\nThe quick", "The quick brown fox"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    ckpt = write_mixtral(d / "ckpt", hidden=128, ff=128, n_experts=8, n_layers=3, seed=3)
    return convert(ckpt, d / "m.gguf", "q8_0").path


@pytest.fixture(scope="module")
def predictor_file(model, tmp_path_factory):
    engine = Engine(model, EngineConfig(n_threads=1))
    rec = TraceRecorder(engine)
    for p in PROMPTS:
        list(engine.stream_generate(p, 24, stop_at_eos=False))
    trace = rec.detach()
    engine.close()
    path = tmp_path_factory.mktemp("pred") / "t.json"
    trace.save(path)
    train([path], path.with_name("p.onnx"), epochs=4, hidden=32)
    return path.with_name("p.onnx"), trace


def _generate(model, config, prompts=PROMPTS, n=16):
    engine = Engine(model, config)
    try:
        events = [e for p in prompts for e in engine.stream_generate(p, n, stop_at_eos=False)]
        return engine, events
    finally:
        engine.close()


def test_recorded_lookahead_row_zero_is_the_layers_own_routing(predictor_file):
    _, trace = predictor_file
    assert trace.router_logits is not None and len(trace.router_logits) == len(trace.steps)
    for step, logits in zip(trace.steps, trace.router_logits):
        for i, layer in enumerate(trace.moe_layers):
            rows = np.asarray(logits[layer])
            assert rows.shape == (min(4, len(trace.moe_layers) - i), trace.n_experts)
            top = torch.topk(torch.from_numpy(rows[0]), trace.top_k).indices.tolist()
            assert set(top) == set(step[layer][-1])


def test_tokens_identical_with_every_predictor_at_half_budget(model, predictor_file):
    path, _ = predictor_file
    _, ref = _generate(model, EngineConfig(n_threads=1))
    probe = Engine(model)
    budget = probe.expert_bytes_total // 2
    probe.close()
    kinds = {"none": Predictor, "router": RouterPredictor, "prior": PriorPredictor, "cooccur": CooccurPredictor,
             "learned": LearnedPredictor}
    for name, cls in kinds.items():
        config = EngineConfig(budget_bytes=budget, prefetch=True, predictor=name, predictor_path=str(path), n_threads=1)
        engine, events = _generate(model, config)
        assert [e.token for e in events] == [e.token for e in ref], name
        assert type(engine.prefetcher.predictor) is cls and engine.warnings == []
        assert engine.prefetcher.error is None
        assert engine.cache.state.peak_bytes <= budget
        issued = sum(e.cache.prefetch_issued for e in events)
        assert (issued == 0) == (name == "none"), (name, issued)


def test_default_prefetch_is_cross_layer_cooccurrence(model):
    engine = Engine(model, EngineConfig(prefetch=True))
    assert type(engine.prefetcher.predictor) is CooccurPredictor
    assert engine.prefetcher.lookahead is None  # needs no router look-ahead
    engine.close()


@pytest.mark.parametrize("case", ["missing", "corrupt", "mismatched", "not beside"])
def test_bad_predictor_file_falls_back_with_a_clear_warning(model, predictor_file, tmp_path, case):
    path, _ = predictor_file
    if case == "missing":
        given, needle = str(tmp_path / "nope.onnx"), "does not exist"
    elif case == "corrupt":
        (tmp_path / "bad.onnx").write_bytes(path.read_bytes()[:200])
        given, needle = str(tmp_path / "bad.onnx"), "not a readable ONNX predictor"
    elif case == "mismatched":
        from predictor_traces import synthetic_trace
        synthetic_trace(n_prompts=3, n_layers=4).save(tmp_path / "s.json")
        train([tmp_path / "s.json"], tmp_path / "s.onnx", epochs=1, hidden=8)
        given, needle = str(tmp_path / "s.onnx"), "trained for 4 MoE layers x 8 experts"
    else:
        given, needle = None, "no predictor for"
    engine, events = _generate(model, EngineConfig(budget_bytes=None, prefetch=True, predictor="learned",
                                                   predictor_path=given, n_threads=1), PROMPTS[:1], 4)
    assert len(engine.warnings) == 1 and needle in engine.warnings[0]
    assert "prefetching with router speculation instead" in engine.warnings[0]
    assert type(engine.prefetcher.predictor) is RouterPredictor and len(events) == 4


def test_learned_predictor_found_beside_the_model(model, predictor_file):
    path, _ = predictor_file
    beside = beside_path(model)
    beside.write_bytes(path.read_bytes())
    try:
        engine = Engine(model, EngineConfig(prefetch=True, predictor="learned"))
        assert type(engine.prefetcher.predictor) is LearnedPredictor and engine.warnings == []
        engine.close()
    finally:
        beside.unlink()


def test_cli_generate_with_a_corrupt_predictor_continues(model, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    argv = ["generate", str(model), "-p", "def f(x):", "-n", "8", "--budget", "50%", "--predictor", str(bad),
            "--threads", "1"]
    done = subprocess.run([sys.executable, "-m", "edgemoe.cli", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "not a readable ONNX predictor" in done.stderr
    assert "Traceback" not in done.stderr and "8 tokens" in done.stderr


def test_a_failing_predictor_stops_prefetching_not_generation(model):
    class Broken(Predictor):
        def predict(self, q):
            raise RuntimeError("boom")

    engine = Engine(model, EngineConfig(prefetch=True, predictor="none", n_threads=1))
    engine.prefetcher.predictor = Broken()
    events = []
    for event in engine.stream_generate(PROMPTS[0], 6, stop_at_eos=False):
        # keep the prefetch thread up with the compute: a routing it reaches two tokens late is
        # stale and only updates its state, so the predictor might never be asked (a CI flake)
        engine.prefetcher.drain()
        events.append(event)
    engine.close()
    assert len(events) == 6 and isinstance(engine.prefetcher.error, RuntimeError)


def test_cli_predictor_bench(model, predictor_file, tmp_path, capsys):
    from edgemoe.cli import main

    path, _ = predictor_file
    (tmp_path / "prompts.txt").write_text("The quick brown fox\n")
    assert main(["predictor", "bench", str(model), "--predictor", str(path), "--prompts", str(tmp_path / "prompts.txt"),
                 "-n", "4", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("off", "router", "prior", "learned"):
        assert f"│ {label} " in out
    assert "NO" not in out
