"""The edgemoe engine computes what llama.cpp computes, for every architecture, on f32 and
quantised files, at any expert budget, in prefill and in token-by-token decoding.

Oracle: llama-cpp-python's logits on the same GGUF file and token ids (f32 KV cache, no flash
attention). The engine runs every weight matmul through the same ggml kernels on the same bytes,
so it matches llama.cpp far more tightly than llama.cpp matches transformers on quantised files.
Measured max|diff| / max|logit| on the tiny checkpoints (32 tokens):
  f32:  3e-7 .. 8e-7 for every arch (decode vs prefill: the same)
  q8_0: 0 (bit-identical) for qwen2moe, deepseek2; 6e-3 .. 1.2e-2 for mixtral, qwen3moe, olmoe
  q4_k: 3e-7 for qwen2moe, olmoe, qwen3moe; 5e-3 deepseek2, 8e-3 mixtral
The ~1e-2 cases start at one position where a ~1e-7 difference from torch's attention/norm
arithmetic moves an activation across a Q8 rounding boundary (ggml quantises activations for
quantised dot products); later positions inherit a few 1e-3 through attention, and a router
near-tie can make it a few 1e-2 (DeepSeek's YaRN variant at q4_k: 6e-2). Top-1 disagreements
happen only at llama.cpp near-ties (margin < 4e-3 logits; measured top-1 >= 0.969). A real bug
(a missing bias, norm or shared expert, the wrong RoPE pairing or router renormalisation) gives
~1e-1 to 1 everywhere, and the f32 tolerance catches far smaller ones.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from edgemoe.converters.convert import convert
from edgemoe.engine import Engine, EngineConfig
from oracles import llama_logits, rel_max_diff, top1_agreement

ARCHS = ["mixtral", "qwen2moe", "deepseek2", "olmoe", "qwen3moe"]
QTYPES = ["f32", "q8_0", "q4_k"]
PROMPT_IDS = [3 + (37 * i + 11) % 500 for i in range(32)]  # fixed, no special tokens
REL_TOL = {"f32": 1e-4, "q8_0": 1e-1, "q4_k": 1e-1}
MIN_TOP1 = {"f32": 1.0, "q8_0": 0.95, "q4_k": 0.95}
TIGHT_BUDGET_SHARE = 0.3  # of all expert bytes: forces evictions within one forward pass

# models/tiny.py builds OLMoE with 2 KV heads for 4 query heads, which llama.cpp's olmoe loader
# (k-norm over n_embd) cannot load and the converter rightly refuses; real OLMoE has no GQA.
# Same override as the converter's parity test.
CHECKPOINT_OVERRIDES = {"olmoe": {"num_key_value_heads": 4}}


@pytest.fixture(scope="session")
def converted(tiny_checkpoint, tmp_path_factory):
    """Factory (arch, qtype) -> GGUF path; each converted once per session."""
    root = tmp_path_factory.mktemp("engine-archs")

    @functools.cache
    def checkpoint(arch: str):
        if arch in CHECKPOINT_OVERRIDES:
            from test_convert_archs import build_variant

            return build_variant(arch, root / f"{arch}-hf", **CHECKPOINT_OVERRIDES[arch])
        return tiny_checkpoint(arch)

    @functools.cache
    def get(arch: str, qtype: str):
        out = root / f"{arch}-{qtype}.gguf"
        convert(checkpoint(arch), out, qtype)
        return out

    return get


def engine_logits(path) -> np.ndarray:
    engine = Engine(path)
    try:
        return engine.logits(PROMPT_IDS)
    finally:
        engine.close()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_llama_cpp(converted, arch, qtype):
    path = converted(arch, qtype)
    ref = llama_logits(path, PROMPT_IDS)
    got = engine_logits(path)
    rel, top1 = rel_max_diff(got, ref), top1_agreement(got, ref)
    assert rel < REL_TOL[qtype], f"{arch} {qtype}: engine logits differ from llama.cpp's by {rel:.2e} (relative)"
    assert top1 >= MIN_TOP1[qtype], f"{arch} {qtype}: top-1 agreement with llama.cpp {top1:.3f}"


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_tight_budget_gives_identical_logits(converted, arch, qtype):
    path = converted(arch, qtype)
    engine = Engine(path)
    try:
        full = engine.logits(PROMPT_IDS)
        largest = max(s.alloc_bytes for s in engine.specs.values())
        budget = max(int(engine.expert_bytes_total * TIGHT_BUDGET_SHARE), largest)
    finally:
        engine.close()
    engine = Engine(path, EngineConfig(budget_bytes=budget, policy="lru"))
    try:
        tight = engine.logits(PROMPT_IDS)
        stats = engine.cache.step_stats()
    finally:
        engine.close()
    assert stats.evictions > 0, f"{arch} {qtype}: budget {budget} never evicted; the test proves nothing"
    np.testing.assert_array_equal(tight, full)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_token_by_token_matches_prefill(converted, arch):
    """The KV cache path (generation): positions fed one at a time give the prefill's logits."""
    import torch

    engine = Engine(converted(arch, "f32"))
    try:
        want = engine.logits(PROMPT_IDS)
        kv, n_prefill = engine.model.new_kv(len(PROMPT_IDS)), len(PROMPT_IDS) // 2
        with torch.no_grad():
            rows = [engine.model.forward(PROMPT_IDS[:n_prefill], kv, 0, all_logits=True).numpy()]
            rows += [engine.model.forward([t], kv, i).numpy() for i, t in enumerate(PROMPT_IDS) if i >= n_prefill]
    finally:
        engine.close()
    rel = rel_max_diff(np.concatenate(rows), want)
    assert rel < REL_TOL["f32"], f"{arch}: decode vs prefill logits differ by {rel:.2e} (relative)"


# ---- DeepSeek-V2 options the tiny (V2-Lite-shaped) checkpoint does not exercise (f32) ----------

DEEPSEEK_VARIANTS = ["deepseek2-q-lora", "deepseek2-yarn"]  # test_convert_archs.VARIANTS


@pytest.mark.parametrize("variant", DEEPSEEK_VARIANTS)
def test_deepseek2_variant_matches_llama_cpp(variant, tmp_path):
    """DeepSeek-V2's low-rank q (attn_q_a, attn_q_a_norm, attn_q_b) and V2(-Lite)'s YaRN."""
    from test_convert_archs import VARIANTS, build_variant

    arch, overrides = VARIANTS[variant]
    path = convert(build_variant(arch, tmp_path / "hf", **overrides), tmp_path / "m.gguf", "f32").path
    rel = rel_max_diff(engine_logits(path), llama_logits(path, PROMPT_IDS))
    assert rel < REL_TOL["f32"], f"{variant}: relative logit difference {rel:.2e}"


def legacy_mla_copy(src, dst):
    """f32 deepseek2 file `src` as llama.cpp's converters wrote it before absorbed MLA: one fused
    attn_kv_b [H * (nope + v), kv_lora], no *_mla keys, plain per-head key/value lengths."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    n_head = r.fields[f"{arch}.attention.head_count"].contents()
    k_mla, v_mla = (r.fields[f"{arch}.attention.{k}_length_mla"].contents() for k in ("key", "value"))
    replaced = {f"{arch}.attention.{k}": v for k, v in
                (("key_length", k_mla), ("value_length", v_mla), ("head_count_kv", n_head))}
    w = gguf.GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name.endswith("_mla"):
            continue
        value = replaced.get(f.name, f.contents())
        w.add_key_value(f.name, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    for name, data in tensors.items():
        if name.endswith("attn_k_b.weight"):
            k_b, v_b = data, tensors[name.replace("attn_k_b", "attn_v_b")]  # [H, lora, nope], [H, v, lora]
            kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)      # [H, nope + v, lora]
            w.add_tensor(name.replace("attn_k_b", "attn_kv_b"), np.ascontiguousarray(kv_b.reshape(-1, kv_b.shape[-1])))
        elif not name.endswith("attn_v_b.weight"):
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_deepseek2_legacy_fused_kv_b_matches_llama_cpp(converted, tmp_path):
    path = legacy_mla_copy(converted("deepseek2", "f32"), tmp_path / "legacy.gguf")
    rel = rel_max_diff(engine_logits(path), llama_logits(path, PROMPT_IDS))
    assert rel < REL_TOL["f32"], f"relative logit difference {rel:.2e}"
