"""The learned predictor: training on traces, the ONNX file and its metadata, onnxruntime at run
time, and clear errors for missing, corrupt and mismatched files."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edgemoe.cli import main
from edgemoe.predictor.base import PredictorError, RoutingShape
from edgemoe.bench.predictor_compare import compare_predictors
from edgemoe.predictor.onnx_runtime import GGUF_KEY, LearnedPredictor, beside_path, locate
from edgemoe.predictor.replay import queries
from edgemoe.predictor.train import train
from predictor_traces import synthetic_trace


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("predictor")
    synthetic_trace(n_prompts=12, seed=1).save(d / "train.json")
    report = train([d / "train.json"], d / "p.onnx", epochs=25, hidden=64)
    return d / "p.onnx", report


def test_train_exports_onnx_with_the_routing_shape(trained):
    path, report = trained
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["edgemoe.format"] == "edgemoe-predictor/1"
    assert (meta["n_layers"], meta["n_experts"], meta["top_k"], meta["horizon"]) == ("4", "8", "2", "3")
    assert meta["model"] == "synthetic.gguf" and meta["use_logits"] == "1"
    assert report.samples > 1000 and len(report.val_precision_at_k) == 3


def test_onnxruntime_matches_torch(tmp_path):
    from edgemoe.predictor.features import FeatureSpec
    from edgemoe.predictor.model import RoutingMLP
    from edgemoe.predictor.train import export

    torch.manual_seed(0)
    shape = RoutingShape("m.gguf", (1, 3, 5), 6, 2)
    spec = FeatureSpec(3, 6)
    mlp = RoutingMLP(spec.size, 6, 2, hidden=32).eval()
    export(mlp, spec, shape, 2, tmp_path / "p.onnx")
    p = LearnedPredictor(tmp_path / "p.onnx", shape)
    for pt in queries(synthetic_trace(n_prompts=1, n_decode=3, n_layers=3, n_experts=6)):
        with torch.no_grad():
            want = torch.sigmoid(mlp(torch.from_numpy(spec.encode(pt.query))[None]))[0].numpy()
        np.testing.assert_allclose(p.probabilities(pt.query), want, rtol=1e-5, atol=1e-6)


def test_onnxruntime_predicts_the_process(trained):
    path, _ = trained
    held = synthetic_trace(n_prompts=4, seed=7)
    shape = RoutingShape.of_trace(held)
    p = LearnedPredictor(path, shape)
    assert p.needs_logits and p.horizon == 3 and p.model_mismatch is None
    # the synthetic process: layer l+1 is layer l shifted by one expert, and the look-ahead is exact
    hits = total = 0
    for pt in queries(held):
        if pt.index < 3 and len(pt.ids) == 1:
            predicted = {e for a, e in p.predict(pt.query) if a == 1}
            hits += len(predicted & {(e + 1) % 8 for e in pt.ids[0]})
            total += 2
    assert hits / total > 0.95
    probs = p.probabilities(next(iter(queries(held))).query)
    assert probs.shape == (3, 8) and np.all((probs >= 0) & (probs <= 1))


def test_learned_beats_router_speculation_on_the_synthetic_process(trained):
    path, _ = trained
    held = synthetic_trace(n_prompts=4, seed=7)
    rows = {r.predictor: r for r in compare_predictors(held, sum(held.expert_bytes.values()) // 2,
                                                       predictor_file=str(path))}
    # the next token's first layer repeats the previous token's 70% of the time: the learned
    # predictor sees that, the router's frequency prior cannot
    assert rows["learned@1"].precision > rows["router"].precision
    assert rows["learned"].recall >= rows["learned@1"].recall


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, for a foreign file
def test_missing_corrupt_foreign_and_mismatched_files(trained, tmp_path):
    path, _ = trained
    shape = RoutingShape("synthetic.gguf", (0, 1, 2, 3), 8, 2)
    with pytest.raises(PredictorError, match="does not exist"):
        LearnedPredictor(tmp_path / "none.onnx", shape)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(PredictorError, match="not a readable ONNX predictor"):
        LearnedPredictor(bad, shape)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(PredictorError, match="not a readable ONNX predictor"):
        LearnedPredictor(cut, shape)
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(foreign), dynamo=False)
    with pytest.raises(PredictorError, match="not an edgemoe routing predictor"):
        LearnedPredictor(foreign, shape)
    with pytest.raises(PredictorError, match=r"trained for 4 MoE layers x 8 experts .* has 3 MoE layers x 8"):
        LearnedPredictor(path, RoutingShape("other.gguf", (0, 1, 2), 8, 2))
    with pytest.raises(PredictorError, match=r"x 16 experts"):
        LearnedPredictor(path, RoutingShape("synthetic.gguf", (0, 1, 2, 3), 16, 2))
    renamed = LearnedPredictor(path, RoutingShape("copy.gguf", (0, 1, 2, 3), 8, 2))
    assert "trained on traces of 'synthetic.gguf'" in renamed.model_mismatch


def test_located_beside_the_model_or_embedded_in_its_gguf(trained, tmp_path):
    path, _ = trained
    model = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(PredictorError, match="no predictor for"):
        locate(model)
    beside_path(model).write_bytes(path.read_bytes())
    assert locate(model) == str(tmp_path / "m.predictor.onnx")
    embedded = tmp_path / "e.gguf"
    w = gguf.GGUFWriter(str(embedded), "llama")
    w.add_key_value(GGUF_KEY, list(path.read_bytes()), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    source = locate(embedded)
    assert source == path.read_bytes()
    assert LearnedPredictor(source, RoutingShape("synthetic.gguf", (0, 1, 2, 3), 8, 2)).label == "embedded predictor"


def test_cli_train_and_compare(tmp_path, capsys):
    synthetic_trace(n_prompts=4, seed=2).save(tmp_path / "a.json")
    synthetic_trace(n_prompts=2, seed=3).save(tmp_path / "b.json")
    assert main(["predictor", "train", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "-o",
                 str(tmp_path / "p.onnx"), "--epochs", "2", "--hidden", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["simulate", str(tmp_path / "b.json"), "--compare-predictors", "--predictor", str(tmp_path / "p.onnx"),
                 "--budget", "50%"]) == 0
    out = capsys.readouterr().out
    for name in ("router", "prior", "learned@1", "learned", "belady"):
        assert name in out
    assert main(["predictor", "train", str(tmp_path / "missing.json"), "-o", str(tmp_path / "q.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
