"""`edgemoe predictor train --embed MODEL.gguf` writes the predictor into the model's GGUF
(atomically), the engine's `--predictor learned` then finds it there, and the file stays what it
was otherwise: same tensors, same llama.cpp logits for a stock file."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgemoe.cli import main
from edgemoe.converters.convert import convert
from edgemoe.engine import Engine, EngineConfig
from edgemoe.gguf_file import GGUFFile
from edgemoe.predictor.base import PredictorError
from edgemoe.predictor.embed import embed
from edgemoe.predictor.onnx_runtime import GGUF_KEY, LearnedPredictor, beside_path
from edgemoe.trace import TraceRecorder
from oracles import llama_logits
from predictor_traces import synthetic_trace
from synthetic import write_mixtral

PROMPTS = ["def f(x):\n    return x + 1\nThe quick", "The quick brown fox"]


@pytest.fixture(scope="module")
def model_and_trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("embed")
    ckpt = write_mixtral(d / "ckpt", hidden=128, ff=128, n_experts=8, n_layers=3, seed=3)
    model = convert(ckpt, d / "m.gguf", "q8_0").path
    engine = Engine(model, EngineConfig(n_threads=1))
    rec = TraceRecorder(engine)
    for p in PROMPTS:
        list(engine.stream_generate(p, 24, stop_at_eos=False))
    rec.detach().save(d / "t.json")
    engine.close()
    return model, d / "t.json"


@pytest.fixture
def model(model_and_trace, tmp_path):
    """A private copy of the model (embedding rewrites it)."""
    return shutil.copy(model_and_trace[0], tmp_path / "m.gguf")


def test_train_embed_then_the_engine_uses_it(model, model_and_trace, tmp_path, capsys):
    _, trace = model_and_trace
    before = GGUFFile(model)
    tensors = {n: before.data(n).tobytes() for n in before.tensors}
    assert main(["predictor", "train", str(trace), "--embed", str(model), "--epochs", "3", "--hidden", "16"]) == 0
    assert "(embedded, " in capsys.readouterr().out
    assert not beside_path(model).exists() and not list(tmp_path.glob(".*partial*"))
    after = GGUFFile(model)
    assert after.field(GGUF_KEY) is not None
    assert {n: after.data(n).tobytes() for n in after.tensors} == tensors
    engine = Engine(model, EngineConfig(prefetch=True, predictor="learned", n_threads=1))
    try:
        assert type(engine.prefetcher.predictor) is LearnedPredictor and engine.warnings == []
        assert engine.prefetcher.predictor.label == "embedded predictor"
        assert len(list(engine.stream_generate(PROMPTS[1], 4, stop_at_eos=False))) == 4
    finally:
        engine.close()


def test_embedded_stock_file_stays_stock(model, model_and_trace, tmp_path):
    _, trace = model_and_trace
    ref = llama_logits(model, [1, 5, 9, 30])
    out = tmp_path / "p.onnx"
    assert main(["predictor", "train", str(trace), "-o", str(out), "--embed", str(model), "--epochs", "2",
                 "--hidden", "16"]) == 0
    assert out.is_file()
    np.testing.assert_array_equal(llama_logits(model, [1, 5, 9, 30]), ref)  # stock llama.cpp loads it as before
    assert main(["inspect", str(model)]) == 0
    from edgemoe.inspect_model import summarize

    s = summarize(GGUFFile(model))
    assert s.stock_loadable and GGUF_KEY in s.stock_reason
    from edgemoe.llama_backend import open_llama

    open_llama(model).close()  # --backend llama accepts it


def test_embedding_again_replaces_the_predictor(model, model_and_trace, tmp_path):
    from edgemoe.predictor.train import train

    _, trace = model_and_trace
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    train([trace], a, epochs=2, hidden=16, seed=0)
    train([trace], b, epochs=2, hidden=24, seed=1)
    embed(model, a)
    embed(model, b)
    m = GGUFFile(model)
    assert bytes(np.asarray(m.field(GGUF_KEY), np.uint8)) == b.read_bytes()
    assert m.keys().count(GGUF_KEY) == 1


def test_predictor_for_another_model_is_refused_before_training(model, tmp_path, capsys):
    other = tmp_path / "other.json"
    synthetic_trace(n_layers=5, n_experts=8).save(other)  # the model has 3 MoE layers
    before = model.read_bytes()
    assert main(["predictor", "train", str(other), "--embed", str(model)]) == 2
    err = capsys.readouterr()
    assert "embed a predictor in the model it was traced on" in err.err and "epoch" not in err.err
    assert model.read_bytes() == before


def test_embed_refuses_a_mismatched_onnx(model, tmp_path):
    from edgemoe.predictor.train import train

    other = tmp_path / "other.json"
    synthetic_trace(n_layers=5, n_experts=8).save(other)
    train([other], tmp_path / "o.onnx", epochs=2, hidden=16)
    before = model.read_bytes()
    with pytest.raises(PredictorError, match="trained for 5 MoE layers"):
        embed(model, tmp_path / "o.onnx")
    assert model.read_bytes() == before


def test_train_needs_an_output(model_and_trace, capsys):
    assert main(["predictor", "train", str(model_and_trace[1])]) == 2
    assert "-o FILE.onnx, --embed MODEL.gguf" in capsys.readouterr().err
