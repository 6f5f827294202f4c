"""Reference logits for parity tests: transformers for HF checkpoints, llama.cpp for GGUF files.

Both run the same token ids (no tokenizer in the loop) and return float32 [n_tokens, n_vocab],
one row of next-token logits per position.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def hf_logits(model_dir: str | Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention in f32: the plain softmax(QK^T)V that llama.cpp's f32 path computes
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long))
    return out.logits[0].float().numpy()


# llama.cpp's KV cache type ids (ggml types) for `llama_logits(kv=...)`
LLAMA_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def llama_logits(gguf_path: str | Path, ids: list[int], n_threads: int = 2, kv: str = "f32",
                 repack: bool = True, n_prefill: int | None = None) -> np.ndarray:
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as low_level

    # kv "f32": f32 KV cache and no flash attention (llama.cpp's default f16 cache alone costs ~1e-3
    # relative, hiding conversion bugs of that size). "f16" / "q8_0": that cache type with flash
    # attention, the kernel the edgemoe engine attends with on those caches. repack=False: no CPU
    # weight repacking (model param use_extra_bufts), so quantized matmuls run the plain ggml kernels
    # (repacked ones accumulate in another order). n_prefill: evaluate that many tokens at once, then
    # the rest one at a time (decoding), as the rows of one [T, V] array.
    defaults = low_level.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = repack
        return p

    low_level.llama_model_default_params = params  # Llama() takes its model params from this
    try:
        llm = Llama(str(gguf_path), logits_all=True, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)),
                    type_k=LLAMA_KV_TYPES[kv], type_v=LLAMA_KV_TYPES[kv], flash_attn=kv != "f32",
                    n_threads=n_threads, verbose=False)
    finally:
        low_level.llama_model_default_params = defaults
    try:
        if n_prefill is None:
            llm.eval(ids)
        else:
            llm.eval(ids[:n_prefill])
            for token in ids[n_prefill:]:
                llm.eval([token])
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def rel_max_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: one number that is small only if every logit agrees."""
    if got.shape != ref.shape:
        raise ValueError(f"logits shapes differ: {got.shape} vs {ref.shape}")
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def top1_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of positions whose argmax token is the same."""
    return float((got.argmax(-1) == ref.argmax(-1)).mean())
