"""Qwen2-MoE / Qwen1.5-MoE: llama.cpp architecture `qwen2moe`.

Routed experts plus one always-on shared expert scaled by sigmoid(shared_expert_gate · x);
q/k/v carry biases. llama.cpp's qwen2moe graph rotates halves (NEOX RoPE), as HF does, so
no Q/K permutation is needed.
"""
from __future__ import annotations

import gguf

from edgemoe.converters.arch.base import ArchConverter, register
from edgemoe.converters.errors import ConvertError


def check_router_norm(conv: ArchConverter, llama_cpp_norm: bool) -> None:
    """llama.cpp hard-codes per architecture whether top-k router weights are renormalised;
    a config that says otherwise would convert into a different model."""
    norm = bool(conv.hp.get("norm_topk_prob", False))
    if norm != llama_cpp_norm:
        raise ConvertError(
            f"{conv.ckpt.folder / 'config.json'}: norm_topk_prob={norm}, but llama.cpp's {conv.arch_name} graph "
            f"always uses norm_topk_prob={llama_cpp_norm}; stock llama.cpp would compute a different model. "
            "Convert only checkpoints trained with that setting.")


def check_all_layers_moe(conv: ArchConverter) -> None:
    """llama.cpp's qwen2moe/qwen3moe graphs run an MoE FFN in every layer (no dense layers,
    no sliding window)."""
    hp, cfg = conv.hp, conv.ckpt.folder / "config.json"
    if hp.get("mlp_only_layers") or (hp.get("decoder_sparse_step") or 1) != 1:
        raise ConvertError(f"{cfg}: dense layers (mlp_only_layers={hp.get('mlp_only_layers')}, "
                           f"decoder_sparse_step={hp.get('decoder_sparse_step')}) are not supported by "
                           f"llama.cpp's {conv.arch_name}; every layer must be MoE")
    if hp.get("use_sliding_window"):
        raise ConvertError(f"{cfg}: use_sliding_window=true is not supported by llama.cpp's {conv.arch_name}")


@register("Qwen2MoeForCausalLM")
class Qwen2MoeConverter(ArchConverter):
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    requires_output = True  # llama.cpp's qwen2moe loader has no tied-embedding fallback

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        check_router_norm(self, llama_cpp_norm=False)
        check_all_layers_moe(self)
        hidden, n_head = self._require("hidden_size"), self._require("num_attention_heads")
        if self.hp.get("head_dim") not in (None, hidden // n_head):
            raise ConvertError(f"{self.ckpt.folder / 'config.json'}: head_dim={self.hp['head_dim']} differs from "
                               f"hidden_size/num_attention_heads={hidden // n_head}; "
                               "llama.cpp's qwen2moe assumes they match")
        super().write_hparams(w)
        w.add_expert_feed_forward_length(self._require("moe_intermediate_size"))
        w.add_expert_shared_feed_forward_length(self._require("shared_expert_intermediate_size"))
