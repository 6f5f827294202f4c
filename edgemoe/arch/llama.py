"""llama.cpp arch `llama` with experts: Mixtral. Q/K rows were permuted by the converter, so
RoPE here rotates interleaved pairs exactly as llama.cpp does.

The other architectures subclass `Attention` and `Model` and override only what differs:
`neox`, `router_config`, `make_ffn`, `new_kv`."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from edgemoe.arch import register
from edgemoe.expert_cache import ExpertCache
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.layers import Embedding, KVCache, QLinear, project, apply_rope, attention, head_norm, rms_norm, rope_freqs, tensor_f32
from edgemoe.moe import MoEBlock, RouterConfig, SharedExpertMoE
from edgemoe.native.backend import CpuBackend


@dataclass(frozen=True)
class ModelArgs:
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int
    rope_base: float
    eps: float
    n_experts: int
    top_k: int

    @classmethod
    def from_gguf(cls, m: GGUFFile, rope_scalings: tuple[str, ...] = ()) -> "ModelArgs":
        """rope_scalings: RoPE scaling types (besides none) the calling architecture implements."""
        check_rope_scaling(m, rope_scalings)
        num = functools.partial(_number, m)
        n_heads = num("attention.head_count")
        hidden = num("embedding_length")
        head_dim = num("attention.key_length", hidden // n_heads)
        args = cls(num("block_count"), hidden, n_heads, num("attention.head_count_kv", n_heads, low=1), head_dim,
                   num("rope.dimension_count", head_dim, low=0), num("rope.freq_base", 10000.0, float),
                   num("attention.layer_norm_rms_epsilon", 1e-5, float, low=0),
                   num("expert_count", 0, low=0), num("expert_used_count", 0, low=0))
        if (n_heads % args.n_kv_heads or args.rope_dim > head_dim or args.rope_dim % 2
                or args.top_k > args.n_experts):
            raise ModelFileError(f"{m.path}: inconsistent hyper-parameters (heads {n_heads}, kv heads {args.n_kv_heads}, "
                                 f"head dim {head_dim}, rope dims {args.rope_dim}, experts {args.top_k} of "
                                 f"{args.n_experts}); the file is corrupt, re-create it")
        return args


def _number(m: GGUFFile, name: str, default=None, kind=int, low=1):
    """A numeric hyper-parameter `{arch}.{name}`, at least `low` (an error naming the file otherwise)."""
    value = m.arch_field(name, default)
    if value is None:
        raise ModelFileError(f"{m.path} lacks metadata key '{m.arch}.{name}'; re-create it with `edgemoe convert`")
    if isinstance(value, (str, bytes, list)) or not value >= low:
        raise ModelFileError(f"{m.path}: {m.arch}.{name} = {value!r} is not a number >= {low}; the file is corrupt")
    return kind(value)


def check_rope_scaling(m: GGUFFile, supported: tuple[str, ...] = ()) -> None:
    kind = m.arch_field("rope.scaling.type")
    if kind not in (None, "none", *supported):
        raise ModelFileError(f"{m.path}: RoPE scaling {kind!r} ({m.arch}.rope.scaling.type) is not supported by "
                             "the edgemoe engine yet; run this file with --backend llama")


class Attention:
    neox = False  # llama.cpp's rope type of the arch: NORM (interleaved pairs) or NEOX (halves)

    def __init__(self, m: GGUFFile, layer: int, args: ModelArgs, backend: CpuBackend):
        p = f"blk.{layer}."
        self.q = QLinear(m, p + "attn_q.weight", backend, bias=p + "attn_q.bias")
        self.k = QLinear(m, p + "attn_k.weight", backend, bias=p + "attn_k.bias")
        self.v = QLinear(m, p + "attn_v.weight", backend, bias=p + "attn_v.bias")
        self.o = QLinear(m, p + "attn_output.weight", backend)
        # OLMoE / Qwen3-MoE q/k RMS-norms, applied before RoPE (absent in Mixtral and Qwen2-MoE)
        self.q_norm = tensor_f32(m, p + "attn_q_norm.weight") if p + "attn_q_norm.weight" in m.tensors else None
        self.k_norm = tensor_f32(m, p + "attn_k_norm.weight") if p + "attn_k_norm.weight" in m.tensors else None
        self.layer, self.args = layer, args
        self.freqs = rope_freqs(args.rope_dim, args.rope_base)

    def __call__(self, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        a = self.args
        T = x.shape[0]
        pos = torch.arange(start, start + T)
        q, k, v = project([self.q, self.k, self.v], x)
        q = q.view(T, a.n_heads, a.head_dim)
        k = k.view(T, a.n_kv_heads, a.head_dim)
        if self.q_norm is not None:
            q = head_norm(q, self.q_norm, a.eps)
        if self.k_norm is not None:
            k = head_norm(k, self.k_norm, a.eps)
        q = apply_rope(q, pos, self.freqs, self.neox)
        k = apply_rope(k, pos, self.freqs, self.neox)
        v = v.view(T, a.n_kv_heads, a.head_dim)
        keys, values = kv.append(self.layer, k, v, start)
        return self.o(attention(q, keys, values, start, 1.0 / math.sqrt(a.head_dim)))


class NeoxAttention(Attention):
    neox = True  # llama_model_rope_type: qwen2moe, qwen3moe, olmoe rotate halves


@register("llama")
class Model:
    args_class = ModelArgs
    attention_class = Attention
    router_config = staticmethod(lambda args: RouterConfig(top_k=args.top_k, normalize=True))

    def __init__(self, m: GGUFFile, backend: CpuBackend, cache: ExpertCache):
        self.args = args = self.args_class.from_gguf(m)
        if not args.n_experts:
            raise ValueError(f"{m.path} has no experts; edgemoe runs MoE models (use --backend llama for dense ones)")
        self.embed = Embedding(m, "token_embd.weight")
        out_name = "output.weight" if "output.weight" in m.tensors else "token_embd.weight"
        self.output = QLinear(m, out_name, backend)
        hidden = (args.hidden_size,)
        self.norm = tensor_f32(m, "output_norm.weight", hidden)
        self.layers = []
        for i in range(args.n_layers):
            p = f"blk.{i}."
            self.layers.append((tensor_f32(m, p + "attn_norm.weight", hidden), self.attention_class(m, i, args, backend),
                                tensor_f32(m, p + "ffn_norm.weight", hidden), self.make_ffn(m, i, backend, cache)))

    def make_ffn(self, m: GGUFFile, layer: int, backend: CpuBackend, cache: ExpertCache):
        """The FFN of `layer`: x [T, D] -> [T, D]. Here routed experts only."""
        return MoEBlock(layer, tensor_f32(m, f"blk.{layer}.ffn_gate_inp.weight"), self.router_config(self.args),
                        cache, backend)

    def new_kv(self, n_ctx: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, n_ctx, a.n_kv_heads, a.head_dim, a.head_dim)

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The routed-expert blocks in layer order (dense FFN layers have none)."""
        ffns = [layer[3] for layer in self.layers]
        return [f.moe if isinstance(f, SharedExpertMoE) else f for f in ffns
                if isinstance(f, (MoEBlock, SharedExpertMoE))]

    def forward(self, tokens: list[int], kv: KVCache, start: int, all_logits: bool = False) -> torch.Tensor:
        """tokens at positions start.. -> logits [T, V] (or [1, V] for the last token)."""
        x = self.embed(tokens)  # [T, D]
        eps = self.args.eps
        for attn_norm, attn, ffn_norm, ffn in self.layers:
            x = x + attn(rms_norm(x, attn_norm, eps), kv, start)
            x = x + ffn(rms_norm(x, ffn_norm, eps))
        x = rms_norm(x if all_logits else x[-1:], self.norm, eps)
        return self.output(x)
