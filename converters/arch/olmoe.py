"""OLMoE: llama.cpp architecture `olmoe`.

Q/K RMS-norms span the whole projection (weights [n_head * head_dim]), not one head; the
GGUF keeps them as they are. Router weights are never renormalised after top-k in
llama.cpp's graph, and RoPE is NEOX (rotate-half), as in HF: no permutation.
"""
from __future__ import annotations

import gguf

from edgemoe.converters.arch.base import ArchConverter, register
from edgemoe.converters.arch.qwen2moe import check_router_norm
from edgemoe.converters.errors import ConvertError


@register("OlmoeForCausalLM")
class OlmoeConverter(ArchConverter):
    gguf_arch = gguf.MODEL_ARCH.OLMOE
    requires_output = True  # llama.cpp's olmoe loader has no tied-embedding fallback

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        check_router_norm(self, llama_cpp_norm=False)
        cfg = self.ckpt.folder / "config.json"
        if self.hp.get("clip_qkv") is not None:
            raise ConvertError(f"{cfg}: clip_qkv={self.hp['clip_qkv']} is not supported by llama.cpp's olmoe "
                               "(it never clamps q/k/v)")
        n_head = self._require("num_attention_heads")
        if (self.hp.get("num_key_value_heads") or n_head) != n_head:
            # the k-norm weight spans n_kv_head * head_dim, llama.cpp's loader expects n_embd
            raise ConvertError(f"{cfg}: num_key_value_heads={self.hp['num_key_value_heads']} != "
                               f"num_attention_heads={n_head}; llama.cpp's olmoe needs full multi-head attention")
        # feed_forward_length (intermediate_size) is the expert width for olmoe
        super().write_hparams(w)
