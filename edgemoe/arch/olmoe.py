"""llama.cpp arch `olmoe`: q/k RMS-norms over the whole projection (Attention handles them from
the weight's size), NEOX RoPE, top-k router weights not renormalised."""
from __future__ import annotations

from edgemoe.arch import llama, register
from edgemoe.moe import RouterConfig


@register("olmoe")
class Model(llama.Model):
    attention_class = llama.NeoxAttention
    router_config = staticmethod(lambda args: RouterConfig(top_k=args.top_k, normalize=False))
