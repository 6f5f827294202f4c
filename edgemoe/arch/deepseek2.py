"""llama.cpp arch `deepseek2` (DeepSeek-V2 / V2-Lite): multi-head latent attention, leading dense
FFN layers, routed experts plus ungated shared experts.

MLA runs in llama.cpp's absorbed form: attn_k_b maps each head's q_nope into the latent space,
attention runs over the cached latent c = norm(kv_a(x)[:kv_lora]) and the shared rope key, and
attn_v_b maps each head's latent output to v. Both per-head maps go through ggml on the file's
bytes, so the quantised activations match llama.cpp's (the decompressed form, k_b/v_b
dequantised into per-head K/V, is the same algebra but differs from llama.cpp at q4_k by ~10%
of the largest logit on the tiny model). Legacy files with a fused attn_kv_b decompress, as
llama.cpp does. RoPE is NORM (interleaved) on the trailing rope_dim dims of q and on k_pe."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from edgemoe.arch import llama, register
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.kv_cache import KVCache
from edgemoe.layers import SwiGLU, attend, eager, norm
from edgemoe.moe import RouterConfig, SharedExpertMoE
from edgemoe.native.ops import RopeParams, Tensor
from edgemoe.native.buffers import FileWeights

_GATING = {0: "softmax", 1: "softmax", 2: "sigmoid"}  # llama.cpp: 0 (unset) means softmax for V2 files


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    # head_dim: the per-head key width qk_nope + qk_rope (MLA: before absorption)
    mla: bool  # attn_k_b/attn_v_b (absorbed, latent cache) rather than legacy fused attn_kv_b
    kv_lora_rank: int
    v_dim: int
    n_dense_lead: int
    router: RouterConfig
    rope: RopeParams  # NORM rope on the trailing rope_dim values of q and on k_pe, YaRN where the file says
    kq_mscale: float  # YaRN's attention-scale factor (mscale in llama.cpp's deepseek2 graph); 1 without

    @classmethod
    def from_gguf(cls, m: GGUFFile) -> "ModelArgs":
        base = llama.ModelArgs.from_gguf(m, rope_scalings=("yarn",))
        # llama.cpp's n_embd_head_{k,v}_mla(): the *_mla keys, else the plain lengths (legacy files)
        k_dim, v_dim = m.arch_field("attention.key_length_mla"), m.arch_field("attention.value_length_mla")
        mla = bool(k_dim and v_dim)
        if not mla:
            k_dim, v_dim = base.head_dim, m.arch_field("attention.value_length", base.head_dim)
        return cls(**{**dataclasses.asdict(base), "n_kv_heads": base.n_heads, "head_dim": int(k_dim)}, mla=mla,
                   kv_lora_rank=int(m.require(f"{m.arch}.attention.kv_lora_rank")), v_dim=int(v_dim),
                   n_dense_lead=int(m.arch_field("leading_dense_block_count", 0)), router=_router(m, base.top_k),
                   **_yarn(m, base))


def _yarn(m: GGUFFile, base: llama.ModelArgs) -> dict:
    """YaRN exactly as llama.cpp derives it for deepseek2 (llama_context's yarn_attn_factor, then
    the deepseek2 graph's mscale). DeepSeek's checkpoints have mscale == mscale_all_dim (the
    converter refuses others), so the rope magnitude cancels to 1 and the attention scale is
    multiplied by (1 + 0.1 * mscale_all_dim * ln factor)^2, as in HF."""
    if m.arch_field("rope.scaling.type") != "yarn":
        return {"rope": RopeParams(base.rope_dim, False, base.rope_base), "kq_mscale": 1.0}
    factor = float(m.arch_field("rope.scaling.factor", 0.0)) or 1.0
    log_mul = float(m.arch_field("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1  # undo the converter's 0.1

    def get_mscale(scale: float, mscale: float) -> float:
        return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0

    if log_mul:
        mscale = log_mul if log_mul != 1.0 else 1.0  # llama.cpp's deepseek2 special case
        attn_factor = get_mscale(factor, mscale) / get_mscale(factor, log_mul)
    else:
        attn_factor = get_mscale(factor, 1.0)
    attn_factor *= float(m.arch_field("rope.scaling.attn_factor", 1.0)) / (1.0 + 0.1 * math.log(factor))
    attn_factor_org = attn_factor * (1.0 + 0.1 * math.log(factor))
    n_ctx_orig = int(m.arch_field("rope.scaling.original_context_length", 0) or m.arch_field("context_length"))
    # beta_fast 32, beta_slow 1: llama.cpp's deepseek2 never reads the file's yarn_beta_* keys
    # ext_factor 1: llama.cpp's default for YaRN files (ggml's rope_yarn ramps between the corr dims)
    rope = RopeParams(base.rope_dim, False, base.rope_base, n_ctx_orig, 1.0 / factor, 1.0, attn_factor, 32.0, 1.0)
    return {"rope": rope, "kq_mscale": attn_factor_org * (1.0 + 0.1 * log_mul * math.log(factor))}


def _router(m: GGUFFile, top_k: int) -> RouterConfig:
    gating = int(m.arch_field("expert_gating_func", 0))
    if gating not in _GATING:
        raise ModelFileError(f"{m.path}: {m.arch}.expert_gating_func={gating} is not supported by the edgemoe "
                             "engine (softmax or sigmoid only); run this file with --backend llama")
    if int(m.arch_field("expert_group_count", 1) or 1) > 1:
        raise ModelFileError(f"{m.path}: grouped expert selection ({m.arch}.expert_group_count) is not supported "
                             "by the edgemoe engine; run this file with --backend llama")
    if any(name.endswith("exp_probs_b.bias") for name in m.tensors):
        raise ModelFileError(f"{m.path}: expert selection biases (ffn_exp_probs_b, DeepSeek-V3 style) are not "
                             "supported by the edgemoe engine; run this file with --backend llama")
    scale = float(m.arch_field("expert_weights_scale", 0.0))
    return RouterConfig(top_k=top_k, gating=_GATING[gating], normalize=bool(m.arch_field("expert_weights_norm", False)),
                        scale=scale if scale not in (0.0, 1.0) else 1.0)  # llama.cpp skips 0 and 1


class Attention:
    """MLA. q: [nope + rope, H, T]; one rope key k_pe per token, shared by all heads."""

    def __init__(self, m: GGUFFile, weights: FileWeights, layer: int, args: ModelArgs, backend):
        p = f"blk.{layer}."
        if p + "attn_q.weight" in m.tensors:  # V2-Lite: plain q
            self.q_a, self.q = None, weights.matrix(p + "attn_q.weight")
        else:  # V2: low-rank q with its own norm
            self.q_a, self.q_a_norm = weights.matrix(p + "attn_q_a.weight"), weights[p + "attn_q_a_norm.weight"]
            self.q = weights.matrix(p + "attn_q_b.weight")
        self.kv_a = weights.matrix(p + "attn_kv_a_mqa.weight")        # ne [D, lora + rope]
        self.kv_a_norm = weights[p + "attn_kv_a_norm.weight"]  # [lora]
        if args.mla:
            self.k_b = weights[p + "attn_k_b.weight"]  # ne [nope, lora, H]
            self.v_b = weights[p + "attn_v_b.weight"]  # ne [lora, v, H]
        else:
            self.kv_b = weights.matrix(p + "attn_kv_b.weight")  # ne [lora, H * (nope + v)]
        self.o = weights.matrix(p + "attn_output.weight")
        self.layer, self.args, self.backend = layer, args, backend

    def build(self, g, x: Tensor, kv) -> Tensor:
        """x [D, T] (normed) -> [D, T], as llama.cpp's deepseek2 graph."""
        a = self.args
        T, H, rope, lora = x.ne[1], a.n_heads, a.rope_dim, a.kv_lora_rank
        nope, width = a.head_dim - rope, a.head_dim
        pos, f32 = kv.pos(g), 4
        q = g.mul_mat(self.q, x if self.q_a is None else norm(g, g.mul_mat(self.q_a, x), self.q_a_norm, a.eps))
        q = g.reshape(q, width, H, T)                                                      # [nope + rope, H, T]
        q_nope = g.view_3d(q, nope, H, T, f32 * width, f32 * width * H, 0)
        q_pe = g.rope(g.view_3d(q, rope, H, T, f32 * width, f32 * width * H, f32 * nope), pos, a.rope)
        kv_a = g.mul_mat(self.kv_a, x)                                                     # [lora + rope, T]
        c = norm(g, g.view_2d(kv_a, lora, T, f32 * (lora + rope), 0), self.kv_a_norm, a.eps)  # [lora, T]
        k_pe = g.rope(g.view_3d(kv_a, rope, 1, T, f32 * (lora + rope), f32 * (lora + rope), f32 * lora), pos, a.rope)
        scale = a.kq_mscale ** 2 / math.sqrt(width)  # over the per-head width nope + rope, even absorbed
        if a.mla:
            # absorbed, as llama.cpp: the cache holds [c, k_pe] as one KV head and V is its first lora values;
            # q_nope . (k_b^T c) == (k_b q_nope) . c and v_b (p . c) == p . (v_b c)
            q_abs = g.permute(g.mul_mat(self.k_b, g.permute(q_nope, 0, 2, 1, 3)), 0, 2, 1, 3)  # [lora, H, T]
            q = g.concat(q_abs, q_pe, 0)                                                   # [lora + rope, H, T]
            k = g.concat(g.reshape(c, lora, 1, T), k_pe, 0)                                # [lora + rope, 1, T]
            latent = attend(g, kv, self.layer, q, k, None, lora, scale)                    # [lora, H, T]
            out = g.permute(g.mul_mat(self.v_b, g.permute(latent, 0, 2, 1, 3)), 0, 2, 1, 3)  # [v, H, T]
            return g.mul_mat(self.o, g.reshape(g.cont(out), a.v_dim * H, T))
        kvb = g.mul_mat(self.kv_b, c)                                                      # [H * (nope + v), T]
        step = f32 * (nope + a.v_dim)
        k_nope = g.view_3d(kvb, nope, H, T, step, step * H, 0)
        v = g.cont(g.view_3d(kvb, a.v_dim, H, T, step, step * H, f32 * nope))             # [v, H, T]
        k = g.concat(g.cont(k_nope), g.repeat(k_pe, q_pe), 0)                              # [nope + rope, H, T]
        out = attend(g, kv, self.layer, g.concat(g.cont(q_nope), q_pe, 0), k, v, a.v_dim, scale)
        return g.mul_mat(self.o, g.reshape(out, a.v_dim * H, T))

    def __call__(self, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        kv.set_step(start, x.shape[0])
        return eager(self.backend, lambda g, t: self.build(g, t, kv), x)


@register("deepseek2")
class Model(llama.Model):
    args_class = ModelArgs
    attention_class = Attention
    router_config = staticmethod(lambda args: args.router)

    def make_ffn(self, m, layer, backend, cache):
        if layer < self.args.n_dense_lead:
            return SwiGLU(self.weights, layer, backend)
        shared = SwiGLU(self.weights, layer, backend, "_shexp")
        return SharedExpertMoE(super().make_ffn(m, layer, backend, cache), shared)

    def new_kv(self, n_ctx: int, n_batch: int | None = None) -> KVCache:
        a = self.args
        if a.mla:  # one latent head: keys [c, k_pe], values c (a view of the keys)
            return KVCache(self.backend, a.n_layers, n_ctx, a.kv_lora_rank + a.rope_dim, None, self.kv_type, n_batch,
                           (a.kv_lora_rank + a.rope_dim, a.kv_lora_rank))
        return KVCache(self.backend, a.n_layers, n_ctx, a.n_heads * a.head_dim, a.n_heads * a.v_dim, self.kv_type,
                       n_batch, (a.head_dim, a.v_dim))
