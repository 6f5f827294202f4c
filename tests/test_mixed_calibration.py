"""Calibration statistics against transformers (the oracle) on the same tokens: routing
frequencies, gate weights, the experts' input statistics (imatrix); errors fall with bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from edgemoe.converters.calib_text import CalibrationText
from edgemoe.converters.calibration import CANDIDATE_TYPES, calibrate, token_windows
from edgemoe.converters.convert import convert

N_TOKENS = 512
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def text():
    from edgemoe.models.corpus import load_corpus

    return CalibrationText(load_corpus().train[:400], "first 400 train documents")


@pytest.fixture(scope="module")
def mixtral_calibration(tiny_checkpoint, text):
    return calibrate(tiny_checkpoint("mixtral"), text, n_tokens=N_TOKENS, n_threads=1, imatrix="auto")


def _hf_reference(ckpt, windows):
    """Per layer: (router probabilities [N, E], MoE input [N, D]) from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0][0]))
             for i, layer in enumerate(model.model.layers)]
    logits: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for w in windows:
            out = model(torch.tensor([w]), output_router_logits=True)
            for i, lg in enumerate(out.router_logits):
                logits.setdefault(i, []).append(lg.reshape(len(w), -1))
    for h in hooks:
        h.remove()
    return {i: (torch.softmax(torch.cat(logits[i]), -1), torch.cat(inputs[i])) for i in logits}


def test_stats_match_transformers_on_the_same_tokens(tiny_checkpoint, tmp_path, text, mixtral_calibration):
    ckpt, calib = tiny_checkpoint("mixtral"), mixtral_calibration
    from edgemoe.tokenizer import Tokenizer

    tok_path = convert(ckpt, tmp_path / "tok.gguf", "q8_0").path
    windows = token_windows(Tokenizer(tok_path), text, N_TOKENS, 256)
    assert calib.n_tokens == sum(map(len, windows)) == N_TOKENS
    ref = _hf_reference(ckpt, windows)
    for layer, (probs, x) in ref.items():
        w, ids = torch.topk(probs, 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)  # Mixtral renormalises its top-2
        for e in range(probs.shape[1]):
            st = calib.experts[(layer, e)]
            routed = (ids == e).any(-1)
            # the calibration's dense path runs in f16: a near-tie may route a token differently
            assert abs(st.tokens - int(routed.sum())) <= 0.02 * N_TOKENS, (layer, e)
            if routed.sum() < 20:
                continue
            assert st.mean_gate() == pytest.approx(float(w[ids == e].mean()), abs=0.02)
            want_sq = (x[routed] ** 2).sum(0).numpy()
            assert np.abs(st.input_sq - want_sq).max() <= 0.03 * want_sq.max(), (layer, e)
    assert sum(s.tokens for s in calib.experts.values()) == 2 * N_TOKENS * 3  # top-2, 3 layers


def test_errors_fall_with_bits_and_importance_follows_routing(mixtral_calibration):
    calib = mixtral_calibration
    for st in calib.experts.values():
        if st.tokens == 0:
            assert st.importance == 0 and st.imatrix() is None
            continue
        errors = [st.rel_error[t] for t in CANDIDATE_TYPES]
        assert all(a > b for a, b in zip(errors, errors[1:])), (st.layer, st.expert, errors)
        assert errors[0] < 0.5 and errors[-1] < 1e-3  # relative output error: q2_k .. q8_0
        im = st.imatrix()
        assert im["gate"].shape == (256,) and im["down"].shape == (256,) and (im["gate"] > 0).all()
        assert st.cost(QT.Q2_K) == pytest.approx(st.importance * st.rel_error[QT.Q2_K])
    assert calib.frequency((0, 0)) == calib.experts[(0, 0)].tokens / N_TOKENS


def test_imatrix_is_used_where_it_measured_better(mixtral_calibration):
    calib = mixtral_calibration
    routed = {k for k, st in calib.experts.items() if st.tokens}
    assert all(set(calib.experts[k].with_imatrix) == set(CANDIDATE_TYPES) for k in routed)
    choice = {k: QT.Q3_K for k in calib.experts}
    auto = calib.imatrices(choice, "auto")
    assert set(auto) == {k for k in routed if calib.experts[k].with_imatrix[QT.Q3_K]}
    assert set(calib.imatrices(choice, "always")) == routed and calib.imatrices(choice, "never") == {}
    with pytest.raises(ValueError, match="imatrix mode"):
        calib.imatrices(choice, "sometimes")


def test_leading_dense_layers_and_shared_experts_calibrate(tiny_checkpoint, text):
    calib = calibrate(tiny_checkpoint("deepseek2"), text, n_tokens=256, n_threads=1, types=(QT.Q4_K, QT.Q8_0))
    layers = {layer for layer, _ in calib.experts}
    assert 0 not in layers and layers  # DeepSeek's first layer is a dense FFN: no experts to calibrate
    assert all(set(s.rel_error) == {QT.Q4_K, QT.Q8_0} for s in calib.experts.values() if s.tokens)


def test_too_little_text_is_refused(tiny_checkpoint):
    from edgemoe.converters.calib_text import CalibrationError

    with pytest.raises(CalibrationError, match="at least 64"):
        calibrate(tiny_checkpoint("mixtral"), CalibrationText(["a few words"], "tiny.txt"), n_threads=1)
