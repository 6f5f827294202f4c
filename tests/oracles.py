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


def llama_logits(gguf_path: str | Path, ids: list[int], n_threads: int = 2) -> np.ndarray:
    from llama_cpp import Llama

    # f32 KV cache (type_k/type_v = 0) and no flash attention: llama.cpp's default f16 cache
    # alone costs ~1e-3 relative, hiding conversion bugs of that size
    llm = Llama(str(gguf_path), logits_all=True, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)),
                type_k=0, type_v=0, flash_attn=False, n_threads=n_threads, verbose=False)
    try:
        llm.eval(ids)
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
