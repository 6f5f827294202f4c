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
from edgemoe.layers import (HeadLinear, KVCache, QLinear, SwiGLU, YaRN, apply_rope, attention, rms_norm, rope_freqs,
                            tensor_f32)
from edgemoe.moe import RouterConfig, SharedExpertMoE
from edgemoe.native.backend import CpuBackend

_GATING = {0: "softmax", 1: "softmax", 2: "sigmoid"}  # llama.cpp: 0 (unset) means softmax for V2 files


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    # head_dim: the per-head key width qk_nope + qk_rope (MLA: before absorption)
    mla: bool  # attn_k_b/attn_v_b (absorbed, latent cache) rather than legacy fused attn_kv_b
    kv_lora_rank: int
    v_dim: int
    n_dense_lead: int
    router: RouterConfig
    yarn: YaRN | None
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
        return {"yarn": None, "kq_mscale": 1.0}
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
    yarn = YaRN.from_ggml(base.rope_dim, base.rope_base, 1.0 / factor, n_ctx_orig, 32.0, 1.0, attn_factor)
    return {"yarn": yarn, "kq_mscale": attn_factor_org * (1.0 + 0.1 * log_mul * math.log(factor))}


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
    """MLA. q: [T, H, nope + rope]; one rope key k_pe per token, shared by all heads."""

    def __init__(self, m: GGUFFile, layer: int, args: ModelArgs, backend: CpuBackend):
        p = f"blk.{layer}."
        if p + "attn_q.weight" in m.tensors:  # V2-Lite: plain q
            self.q_a, self.q = None, QLinear(m, p + "attn_q.weight", backend)
        else:  # V2: low-rank q with its own norm
            self.q_a = QLinear(m, p + "attn_q_a.weight", backend)
            self.q_a_norm = tensor_f32(m, p + "attn_q_a_norm.weight")
            self.q = QLinear(m, p + "attn_q_b.weight", backend)
        self.kv_a = QLinear(m, p + "attn_kv_a_mqa.weight", backend)  # [kv_lora + rope, D]
        self.kv_a_norm = tensor_f32(m, p + "attn_kv_a_norm.weight")  # [kv_lora]
        if args.mla:
            self.k_b = HeadLinear(m, p + "attn_k_b.weight", backend)  # [H, kv_lora, nope]
            self.v_b = HeadLinear(m, p + "attn_v_b.weight", backend)  # [H, v, kv_lora]
        else:
            self.kv_b = QLinear(m, p + "attn_kv_b.weight", backend)  # [H * (nope + v), kv_lora]
        self.o = QLinear(m, p + "attn_output.weight", backend)
        self.layer, self.args = layer, args
        self.freqs = rope_freqs(args.rope_dim, args.rope_base)

    def __call__(self, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        a = self.args
        T, H, rope, lora = x.shape[0], a.n_heads, a.rope_dim, a.kv_lora_rank
        nope = a.head_dim - rope
        pos = torch.arange(start, start + T)
        q = self.q(x if self.q_a is None else rms_norm(self.q_a(x), self.q_a_norm, a.eps)).view(T, H, a.head_dim)
        q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], pos, self.freqs, False, a.yarn)
        kv_a = self.kv_a(x)                                                     # [T, lora + rope]
        c = rms_norm(kv_a[:, :lora], self.kv_a_norm, a.eps)                     # [T, lora]
        k_pe = apply_rope(kv_a[:, None, lora:], pos, self.freqs, False, a.yarn)  # [T, 1, rope]
        scale = a.kq_mscale ** 2 / math.sqrt(a.head_dim)  # over the per-head width nope + rope, even absorbed
        if a.mla:
            # absorbed, as llama.cpp: the cache holds [c, k_pe] as one KV head;
            # q_nope . (k_b^T c) == (k_b q_nope) . c and v_b (p . c) == p . (v_b c)
            q = torch.cat([self.k_b(q_nope), q_pe], dim=-1)                     # [T, H, lora + rope]
            keys, values = kv.append(self.layer, torch.cat([c[:, None], k_pe], dim=-1), c[:, None], start)
            latent = attention(q, keys, values, start, scale).view(T, H, lora)
            return self.o(self.v_b(latent).reshape(T, H * a.v_dim))
        k_nope, v = self.kv_b(c).view(T, H, nope + a.v_dim).split([nope, a.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(T, H, rope)], dim=-1)                # [T, H, nope + rope]
        keys, values = kv.append(self.layer, k, v, start)
        return self.o(attention(torch.cat([q_nope, q_pe], dim=-1), keys, values, start, scale))


@register("deepseek2")
class Model(llama.Model):
    args_class = ModelArgs
    attention_class = Attention
    router_config = staticmethod(lambda args: args.router)

    def make_ffn(self, m, layer, backend, cache):
        if layer < self.args.n_dense_lead:
            return SwiGLU(m, layer, backend)
        return SharedExpertMoE(super().make_ffn(m, layer, backend, cache), SwiGLU(m, layer, backend, "_shexp"))

    def new_kv(self, n_ctx: int) -> KVCache:
        a = self.args
        if a.mla:  # one latent head: keys [c, k_pe], values c
            return KVCache(a.n_layers, n_ctx, 1, a.kv_lora_rank + a.rope_dim, a.kv_lora_rank)
        return KVCache(a.n_layers, n_ctx, a.n_heads, a.head_dim, a.v_dim)
