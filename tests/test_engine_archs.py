"""The edgemoe engine computes what llama.cpp computes, for every architecture, on f32 and
quantised files, at any expert budget, in prefill and in token-by-token decoding.

Oracle: llama-cpp-python's logits on the same GGUF file and token ids, with the engine's KV cache
type: f16 (both engines' default) with flash attention, or f32 without it (llama.cpp's plain
softmax(QK^T)V, which the engine's f32 cache runs op for op). Both repack q4_k weights for the
CPU (llama.cpp's default; EngineConfig.repack) and are also compared with repacking off (repacked
kernels accumulate in another order: engine repacked vs llama.cpp not, 1e-2 .. 3e-2). The engine
builds llama.cpp's graphs from the same ggml ops on the same bytes, so most cases are
bit-identical. Measured max|diff| / max|logit| on the tiny checkpoints (32 tokens):
  f16 KV: 0 for every arch and type except qwen2moe f32 (1e-4) and q4_k (2e-7)
  f32 KV: 3e-7 .. 5e-7 for f32 files; 0 for q8_0 and q4_k except qwen3moe q8_0 (6e-3)
The 1e-3 .. 1e-2 cases start at one position where a ~1e-7 difference (flash attention's online
softmax against llama.cpp's separate one) moves an activation across a Q8 rounding boundary (ggml
quantises activations for quantised dot products); later positions inherit it through attention.
Top-1 disagreements happen only at llama.cpp near-ties. A real bug (a missing bias, norm or
shared expert, the wrong RoPE pairing or router renormalisation) gives ~1e-1 to 1 everywhere, and
the f32 tolerance catches far smaller ones.
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
KV_TYPES = ["f16", "f32"]
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


def engine_logits(path, kv: str = "f16", repack: bool = True) -> np.ndarray:
    engine = Engine(path, EngineConfig(kv_type=kv, repack=repack))
    try:
        return engine.logits(PROMPT_IDS)
    finally:
        engine.close()


def reference(path, kv: str = "f16", repack: bool = True) -> np.ndarray:
    return llama_logits(path, PROMPT_IDS, kv=kv, repack=repack)


@pytest.mark.parametrize("kv", KV_TYPES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_llama_cpp(converted, arch, qtype, kv):
    path = converted(arch, qtype)
    ref = reference(path, kv)
    got = engine_logits(path, kv)
    rel, top1 = rel_max_diff(got, ref), top1_agreement(got, ref)
    assert rel < REL_TOL[qtype], f"{arch} {qtype} {kv} KV: logits differ from llama.cpp's by {rel:.2e} (relative)"
    assert top1 >= MIN_TOP1[qtype], f"{arch} {qtype} {kv} KV: top-1 agreement with llama.cpp {top1:.3f}"


# q8_0 KV against the f32-KV oracle: measured 1.5e-2 (mixtral), 1.9e-2 (qwen3moe). llama.cpp's own
# q8_0 cache is no oracle here: it rotates Q and K (Hadamard) for quantized caches and lands at
# 7e-2 / 2.2e-1 from its f32 cache on these checkpoints.
Q8_0_KV_TOL = 5e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_without_repacking_matches_llama_cpp_without(converted, arch):
    """EngineConfig(repack=False): q4_k weights in their file layout, plain ggml kernels, as llama.cpp
    with use_extra_bufts off."""
    path = converted(arch, "q4_k")
    rel = rel_max_diff(engine_logits(path, repack=False), reference(path, repack=False))
    assert rel < REL_TOL["q4_k"], f"{arch}: unrepacked logits differ from llama.cpp's unrepacked ones by {rel:.2e}"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3moe"])
def test_q8_0_kv_cache_stays_close_to_the_f32_reference(converted, arch):
    path = converted(arch, "q8_0")
    rel = rel_max_diff(engine_logits(path, "q8_0"), reference(path, "f32"))
    assert rel < Q8_0_KV_TOL, f"{arch}: q8_0 KV logits differ from llama.cpp's f32-KV ones by {rel:.2e} (relative)"


def test_q8_0_kv_cache_needs_whole_blocks_per_head(converted):
    """DeepSeek's tiny latent row (64 + 16 rope values) is not a multiple of q8_0's 32-value blocks."""
    with pytest.raises(ValueError, match="multiples of 32.*--kv-type f16"):
        engine_logits(converted("deepseek2", "f32"), "q8_0")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("repacked", [False, True])
def test_tight_budget_gives_identical_logits(converted, arch, qtype, repacked):
    """The cache changes no number, with expert arenas plain (a small budget's default) and
    repacked (a full budget's default, where the type has repacked kernels)."""
    path = converted(arch, qtype)
    engine = Engine(path, EngineConfig(repack_experts=repacked))
    try:
        full = engine.logits(PROMPT_IDS)
        largest = max(s.alloc_bytes for s in engine.specs.values())
        budget = max(int(engine.expert_bytes_total * TIGHT_BUDGET_SHARE), largest)
    finally:
        engine.close()
    engine = Engine(path, EngineConfig(budget_bytes=budget, policy="lru", repack_experts=repacked))
    try:
        tight = engine.logits(PROMPT_IDS)
        stats = engine.cache.step_stats()
    finally:
        engine.close()
    assert stats.evictions > 0, f"{arch} {qtype}: budget {budget} never evicted; the test proves nothing"
    np.testing.assert_array_equal(tight, full)


@pytest.mark.parametrize("kv", KV_TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_token_by_token_matches_llama_cpp(converted, arch, kv):
    """The KV cache path (generation): positions fed one at a time after a prefill give llama.cpp's
    logits fed the same way; with an f32 cache also the prefill's (an f16 cache's decode step
    accumulates V in f16, prefill in f32: ~1e-4 apart, in llama.cpp too)."""
    import torch

    path, n_prefill = converted(arch, "f32"), len(PROMPT_IDS) // 2
    engine = Engine(path, EngineConfig(kv_type=kv))
    try:
        want = engine.logits(PROMPT_IDS)
        cache = engine.model.new_kv(len(PROMPT_IDS))
        with torch.no_grad():
            rows = [engine.model.forward(PROMPT_IDS[:n_prefill], cache, 0, all_logits=True).numpy()]
            rows += [engine.model.forward([t], cache, i).numpy() for i, t in enumerate(PROMPT_IDS) if i >= n_prefill]
        cache.close()
    finally:
        engine.close()
    got = np.concatenate(rows)
    ref = llama_logits(path, PROMPT_IDS, kv=kv, n_prefill=n_prefill)
    rel = rel_max_diff(got, ref)
    assert rel < REL_TOL["f32"], f"{arch} {kv} KV: decoded logits differ from llama.cpp's by {rel:.2e} (relative)"
    if kv == "f32":
        rel = rel_max_diff(got, want)
        assert rel < REL_TOL["f32"], f"{arch}: decode vs prefill logits differ by {rel:.2e} (relative)"


# ---- DeepSeek-V2 options the tiny (V2-Lite-shaped) checkpoint does not exercise (f32) ----------

DEEPSEEK_VARIANTS = ["deepseek2-q-lora", "deepseek2-yarn"]  # test_convert_archs.VARIANTS


@pytest.mark.parametrize("variant", DEEPSEEK_VARIANTS)
def test_deepseek2_variant_matches_llama_cpp(variant, tmp_path):
    """DeepSeek-V2's low-rank q (attn_q_a, attn_q_a_norm, attn_q_b) and V2(-Lite)'s YaRN."""
    from test_convert_archs import VARIANTS, build_variant

    arch, overrides = VARIANTS[variant]
    path = convert(build_variant(arch, tmp_path / "hf", **overrides), tmp_path / "m.gguf", "f32").path
    rel = max(rel_max_diff(engine_logits(path, kv), reference(path, kv)) for kv in KV_TYPES)
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
    rel = max(rel_max_diff(engine_logits(path, kv), reference(path, kv)) for kv in KV_TYPES)
    assert rel < REL_TOL["f32"], f"relative logit difference {rel:.2e}"


@pytest.mark.parametrize("arch", ["mixtral", "deepseek2"])
def test_prefill_in_chunks_matches_one_pass(converted, arch):
    """A prompt longer than n_batch runs in chunks, each attending to the KV rows the last ones wrote."""
    path = converted(arch, "f32")
    whole = engine_logits(path, "f32")
    engine = Engine(path, EngineConfig(kv_type="f32", n_batch=5))  # 32 tokens: 7 chunks, the last of 2
    try:
        chunked = engine.logits(PROMPT_IDS)
    finally:
        engine.close()
    rel = rel_max_diff(chunked, whole)
    assert rel < REL_TOL["f32"], f"{arch}: chunked prefill differs from one pass by {rel:.2e} (relative)"


@pytest.mark.parametrize("qtype", ["f32", "q4_k"])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_graph_decode_is_bit_identical_to_layer_by_layer(converted, arch, qtype):
    """With every expert resident a decode step runs as one graph (edgemoe/token_graph.py): the
    same logits, routing and cache counts as the layer-by-layer path."""
    import torch

    from edgemoe.trace import TraceRecorder

    path, n_prefill = converted(arch, qtype), 8
    runs = {}
    for one_graph in (True, False):
        engine = Engine(path, EngineConfig(token_graph=one_graph))
        try:
            recorder = TraceRecorder(engine, router_logits=False)  # router logits need each layer's input
            cache = engine.model.new_kv(len(PROMPT_IDS))
            with torch.no_grad():
                engine.model.forward(PROMPT_IDS[:n_prefill], cache, 0)
                rows = [engine.model.forward([t], cache, i).numpy() for i, t in enumerate(PROMPT_IDS) if i >= n_prefill]
            cache.close()
            stats = engine.cache.step_stats()
            computed = dict(engine.backend.compute_s)
            runs[one_graph] = (np.concatenate(rows), recorder.detach().steps, stats.hits, stats.misses, computed)
        finally:
            engine.close()
    (got, got_steps, *got_counts, computed), (want, want_steps, *want_counts, _) = runs[True], runs[False]
    assert "token" in computed, f"{arch} {qtype}: no one-graph decode step ran; the test proves nothing"
    np.testing.assert_array_equal(got, want)
    assert got_steps == want_steps
    assert got_counts == want_counts and got_counts[1] == 0  # every expert loaded at open: all hits
