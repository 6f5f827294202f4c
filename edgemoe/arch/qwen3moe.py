"""llama.cpp arch `qwen3moe`: per-head q/k RMS-norms (Attention handles them from the weight's
size), head_dim from attention.key_length, NEOX RoPE, top-k router weights renormalised."""
from __future__ import annotations

from edgemoe.arch import llama, register
from edgemoe.moe import RouterConfig


@register("qwen3moe")
class Model(llama.Model):
    attention_class = llama.NeoxAttention
    router_config = staticmethod(lambda args: RouterConfig(top_k=args.top_k, normalize=True))
