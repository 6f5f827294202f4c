"""Qwen3-MoE: llama.cpp architecture `qwen3moe`.

Per-head Q/K RMS-norms (weights [head_dim]), an explicit head_dim that need not equal
hidden_size / num_attention_heads (written as key/value length), no shared expert, and
top-k router weights always renormalised by llama.cpp. RoPE is NEOX, as in HF.
"""
from __future__ import annotations

import gguf

from edgemoe.converters.arch.base import ArchConverter, register
from edgemoe.converters.arch.qwen2moe import check_all_layers_moe, check_router_norm


@register("Qwen3MoeForCausalLM")
class Qwen3MoeConverter(ArchConverter):
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        check_router_norm(self, llama_cpp_norm=True)
        check_all_layers_moe(self)
        super().write_hparams(w)  # writes key/value length from head_dim
        w.add_expert_feed_forward_length(self._require("moe_intermediate_size"))
