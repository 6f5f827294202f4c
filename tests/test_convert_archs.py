"""Every supported architecture converts to a stock-layout GGUF that llama.cpp loads and runs,
and that computes the same model as transformers.

Oracle: transformers' f32 logits on fixed token ids vs llama-cpp-python's on the converted f32
file (f32 KV cache). Measured max|diff| / max|logit| is ~1e-6 for every arch; a wrong RoPE
convention, a missing norm or a mis-split MLA tensor gives ~1. Quantised files are checked
loosely (per-position correlation of logits): tiny random models are chaotic enough that one
flipped expert choice moves logits a lot, so only a broken layout would fail it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemoe.converters.convert import convert
from edgemoe.converters.errors import ConvertError
from oracles import hf_logits, llama_logits, rel_max_diff

ARCHS = ["mixtral", "qwen2moe", "deepseek2", "olmoe", "qwen3moe"]
PROMPT_IDS = [3 + (37 * i + 11) % 500 for i in range(32)]  # fixed, no special tokens
F32_REL_TOL = 1e-4
# mean over positions of corr(llama logits, HF logits); measured >= 0.999 (q8_0), >= 0.965 (q4_k)
MIN_CORR = {"q8_0": 0.99, "q4_k": 0.9}

# llama.cpp's olmoe loader wants the k-norm over n_embd, i.e. no GQA (real OLMoE has none);
# the parity checkpoint overrides kv heads so it converts whatever models/tiny.py chooses
PARITY_OVERRIDES = {"olmoe": {"num_key_value_heads": 4}}


def build_variant(arch: str, out: Path, **overrides) -> Path:
    """models/tiny.py's (arch, seed 0) checkpoint with config fields overridden."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from edgemoe.models.tiny import ARCHS as TINY, COMMON, seeded_init, tiny_tokenizer
    from edgemoe.models.tokenizer import EOT

    spec = TINY[arch]
    tok_dir = tiny_tokenizer(spec.tokenizer)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    special = ({"bos_token_id": 1, "eos_token_id": 2} if spec.tokenizer == "sentencepiece"
               else {"bos_token_id": tok.token_to_id(EOT), "eos_token_id": tok.token_to_id(EOT)})
    model_cls = getattr(transformers, spec.model_class)
    config = model_cls.config_class(vocab_size=tok.get_vocab_size(),
                                    **{**COMMON, **spec.config, **special, **overrides})
    torch.manual_seed(0)
    model = model_cls(config).eval()
    seeded_init(model, 0)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint `src` whose config.json has `changes` applied (weights untouched)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory, tiny_checkpoint):
    """(arch, checkpoint folder, HF reference logits [T, V]), built once per arch."""
    arch = request.param
    if arch in PARITY_OVERRIDES:
        ckpt = build_variant(arch, tmp_path_factory.mktemp(arch) / "hf", **PARITY_OVERRIDES[arch])
    else:
        ckpt = tiny_checkpoint(arch)  # shared and read-only: conversion only reads it
    return arch, ckpt, hf_logits(ckpt, PROMPT_IDS)


def _mean_corr(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(g, r)[0, 1] for g, r in zip(got, ref)]))


def test_f32_matches_transformers(case, tmp_path):
    arch, ckpt, ref = case
    out = tmp_path / f"{arch}.gguf"
    report = convert(ckpt, out, "f32")
    assert report.fallbacks == {}
    got = llama_logits(out, PROMPT_IDS)
    rel = rel_max_diff(got, ref)
    assert rel < F32_REL_TOL, f"{arch}: llama.cpp logits differ from transformers by {rel:.2e} (relative)"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_quantized_loads_and_runs(case, tmp_path, qtype):
    arch, ckpt, ref = case
    out = tmp_path / f"{arch}-{qtype}.gguf"
    convert(ckpt, out, qtype)
    got = llama_logits(out, PROMPT_IDS)
    assert np.isfinite(got).all()
    corr = _mean_corr(got, ref)
    assert corr > MIN_CORR[qtype], f"{arch} {qtype}: logits correlate {corr:.3f} with transformers'"


# ---- variants of the real checkpoints' options -----------------------------------------------

VARIANTS = {
    # DeepSeek-V2 (not Lite): low-rank q (q_a_proj, q_a_layernorm, q_b_proj)
    "deepseek2-q-lora": ("deepseek2", {"q_lora_rank": 96}),
    # DeepSeek-V2(-Lite)'s YaRN, scaled down: factor 40 / 4096 there
    "deepseek2-yarn": ("deepseek2", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}}),
    # tied embeddings: qwen2moe's loader needs output.weight, the converter copies the embedding
    "qwen2moe-tied": ("qwen2moe", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_f32_matches_transformers(variant, tmp_path):
    arch, overrides = VARIANTS[variant]
    ckpt = build_variant(arch, tmp_path / "hf", **overrides)
    out = tmp_path / "out.gguf"
    convert(ckpt, out, "f32")
    rel = rel_max_diff(llama_logits(out, PROMPT_IDS), hf_logits(ckpt, PROMPT_IDS))
    assert rel < F32_REL_TOL, f"{variant}: relative logit difference {rel:.2e}"


# ---- configs stock llama.cpp would compute differently: refused, naming the key ---------------

REFUSED = [
    ("qwen2moe", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("olmoe", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("qwen3moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen3moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("olmoe", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, "topk_method"),
    ("deepseek2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                       "original_max_position_embeddings": 16, "mscale": 1.0,
                                       "mscale_all_dim": 0.707}}, "mscale"),
]


@pytest.mark.parametrize(("arch", "changes", "key"), REFUSED, ids=[f"{a}-{k}" for a, _, k in REFUSED])
def test_unsupported_config_is_refused(arch, changes, key, tmp_path, tiny_checkpoint):
    ckpt = with_config(tiny_checkpoint(arch), tmp_path / "hf", **changes)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConvertError, match=key):
        convert(ckpt, out, "f32")
    assert not out.exists()
