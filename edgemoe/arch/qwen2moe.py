"""llama.cpp arch `qwen2moe` (Qwen1.5-MoE / Qwen2-MoE): q/k/v biases, NEOX RoPE, top-k router
weights not renormalised, and one always-on shared expert scaled by sigmoid(ffn_gate_inp_shexp . x)."""
from __future__ import annotations

from edgemoe.arch import llama, register
from edgemoe.layers import SwiGLU
from edgemoe.moe import RouterConfig, SharedExpertMoE


@register("qwen2moe")
class Model(llama.Model):
    attention_class = llama.NeoxAttention
    router_config = staticmethod(lambda args: RouterConfig(top_k=args.top_k, normalize=False))

    def make_ffn(self, m, layer, backend, cache):
        gate = self.weights[f"blk.{layer}.ffn_gate_inp_shexp.weight"]  # ne [D]: one logit per token
        return SharedExpertMoE(super().make_ffn(m, layer, backend, cache),
                               SwiGLU(self.weights, layer, backend, "_shexp"), gate)
