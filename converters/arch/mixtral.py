"""Mixtral (and Mistral-style MoE): llama.cpp architecture `llama` with experts.

llama.cpp's `llama` arch applies RoPE to interleaved pairs while HF rotates halves, so Q and
K rows are permuted (the same permutation llama.cpp's converter applies).
"""
from __future__ import annotations

import re

import gguf
import numpy as np
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import ArchConverter, register


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # w: [n_head * head_dim, ...]; rows (half0, half1) per head -> interleaved pairs
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@register("MixtralForCausalLM")
class MixtralConverter(ArchConverter):
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    expert_regex = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
    proj_tensor = {"w1": T.FFN_GATE_EXP, "w3": T.FFN_UP_EXP, "w2": T.FFN_DOWN_EXP}

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        head_dim = self.hp.get("head_dim") or self.hp["hidden_size"] // self.hp["num_attention_heads"]
        w.add_rope_dimension_count(head_dim)

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_qk(data, self.hp["num_attention_heads"])
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_qk(data, self.hp.get("num_key_value_heads") or self.hp["num_attention_heads"])
        return data
