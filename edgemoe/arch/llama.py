"""llama.cpp arch `llama` with experts: Mixtral. Q/K rows were permuted by the converter, so
RoPE rotates interleaved pairs (ggml's NORMAL mode) exactly as llama.cpp does.

The other architectures subclass `Attention` and `Model` and override only what differs:
`neox`, `router_config`, `make_ffn`, `new_kv`. A model builds each layer's first graph
(`build_layer`: attention, residual, norm, then the dense FFN or the router) from the shared
builders in edgemoe.layers and edgemoe.moe; edgemoe.forward runs the graphs."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from edgemoe.arch import register
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.kv_cache import KVCache
from edgemoe.layers import Embedding, Linear, attend, eager, norm, tensor_f32
from edgemoe.moe import MoEBlock, RouterConfig, SharedExpertMoE
from edgemoe.native.ops import RopeParams, Tensor
from edgemoe.native.buffers import FileWeights


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

    def __init__(self, m: GGUFFile, weights: FileWeights, layer: int, args: ModelArgs, backend):
        p = f"blk.{layer}."
        self.q, self.k, self.v = (Linear(weights, p + f"attn_{n}.weight", backend, bias=p + f"attn_{n}.bias")
                                  for n in "qkv")
        self.o = Linear(weights, p + "attn_output.weight", backend)
        # OLMoE / Qwen3-MoE q/k RMS-norms, applied before RoPE (absent in Mixtral and Qwen2-MoE): a weight
        # of head_dim values normalises each head (Qwen3), one of heads*head_dim the whole projection (OLMoE)
        self.q_norm, self.k_norm = weights.get(p + "attn_q_norm.weight"), weights.get(p + "attn_k_norm.weight")
        self.layer, self.args, self.backend = layer, args, backend
        self.rope = RopeParams(args.rope_dim, self.neox, args.rope_base)

    def _qk(self, g, t: Tensor, weight: Tensor | None, n_heads: int) -> Tensor:
        """[H*d, T] -> [d, H, T], RMS-normed per head or over the whole projection when the model has it."""
        a = self.args
        if weight is not None and weight.ne[0] != a.head_dim:
            t = norm(g, t, weight, a.eps)
        t = g.reshape(t, a.head_dim, n_heads, t.ne[1])
        if weight is not None and weight.ne[0] == a.head_dim:
            t = norm(g, t, weight, a.eps)
        return t

    def build(self, g, x: Tensor, kv) -> Tensor:
        """x [D, T] (normed) -> attention output [D, T]; writes this step's K/V into kv."""
        a = self.args
        n_tokens, pos = x.ne[1], kv.pos(g)
        q = g.rope(self._qk(g, self.q.build(g, x), self.q_norm, a.n_heads), pos, self.rope)      # [d, H, T]
        k = g.rope(self._qk(g, self.k.build(g, x), self.k_norm, a.n_kv_heads), pos, self.rope)   # [d, Hkv, T]
        v = g.reshape(self.v.build(g, x), a.head_dim, a.n_kv_heads, n_tokens)                  # [d, Hkv, T]
        out = attend(g, kv, self.layer, q, k, v, a.head_dim, 1.0 / math.sqrt(a.head_dim))      # [d, H, T]
        return self.o.build(g, g.reshape(out, a.head_dim * a.n_heads, n_tokens))

    def __call__(self, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        """Eager, on torch x [T, D] (normed): the calibration and compression tools."""
        kv.set_step(start, x.shape[0])
        return eager(self.backend, lambda g, t: self.build(g, t, kv), x)


class NeoxAttention(Attention):
    neox = True  # llama_model_rope_type: qwen2moe, qwen3moe, olmoe rotate halves


@dataclass
class Block:
    attn_norm: Tensor
    attn: Attention
    ffn_norm: Tensor
    ffn: object            # MoEBlock, SharedExpertMoE or a dense FFN (build(g, x))
    moe: MoEBlock | None   # the routed experts, if any


@register("llama")
class Model:
    args_class = ModelArgs
    attention_class = Attention
    router_config = staticmethod(lambda args: RouterConfig(top_k=args.top_k, normalize=True))

    def __init__(self, m: GGUFFile, backend, cache, *, kv_type: str = "f16", n_batch: int = 512, repack: bool = True,
                 token_graph: bool = True):
        self.args = args = self.args_class.from_gguf(m)
        if not args.n_experts:
            raise ValueError(f"{m.path} has no experts; edgemoe runs MoE models (use --backend llama for dense ones)")
        self.file, self.backend, self.kv_type, self.n_batch = m, backend, kv_type, n_batch
        self.token_graph = token_graph  # decode as one graph when every expert is resident (edgemoe/token_graph.py)
        self.weights = w = FileWeights(m, repack)  # dense matrices repacked where ggml multiplies them faster
        self.embed = Embedding(w, "token_embd.weight", backend)
        self.output = Linear(w, "output.weight" if "output.weight" in m.tensors else "token_embd.weight", backend)
        self.norm_weight = self._norm_weight("output_norm.weight")
        self.blocks = []
        for i in range(args.n_layers):
            p = f"blk.{i}."
            ffn = self.make_ffn(m, i, backend, cache)
            moe = ffn.moe if isinstance(ffn, SharedExpertMoE) else ffn if isinstance(ffn, MoEBlock) else None
            attn = self.attention_class(m, w, i, args, backend)
            self.blocks.append(Block(self._norm_weight(p + "attn_norm.weight"), attn,
                                     self._norm_weight(p + "ffn_norm.weight"), ffn, moe))
        self._runner = None

    def _norm_weight(self, name: str) -> Tensor:
        t = self.weights[name]
        if t.ne[:2] != (self.args.hidden_size, 1):
            raise ModelFileError(f"{self.file.path}: {name} has {t.ne[0]} values, the model needs "
                                 f"{self.args.hidden_size}; the file is corrupt, re-create it")
        return t

    def make_ffn(self, m: GGUFFile, layer: int, backend, cache):
        """The FFN of `layer`. Here routed experts only."""
        name = f"blk.{layer}.ffn_gate_inp.weight"
        return MoEBlock(layer, self.weights[name], tensor_f32(m, name), self.router_config(self.args), cache, backend)

    def layer_ops(self, g, i: int, kv, x: Tensor):
        """Layer i on x [D, T] up to its experts: (out, h, xn, routed). A dense-FFN layer gives
        its output `out` (routed None); an MoE layer h (after attention), xn (the MoE input) and
        routed = the router's (ids, weights) (out None)."""
        b, eps = self.blocks[i], self.args.eps
        h = g.add(b.attn.build(g, norm(g, x, b.attn_norm, eps), kv), x)     # [D, T]  ffn_inp
        xn = norm(g, h, b.ffn_norm, eps)                                    # [D, T]  ffn_norm
        if b.moe is None:
            return g.add(b.ffn.build(g, xn), h), h, xn, None
        return None, h, xn, b.moe.build_router(g, xn)

    def build_layer(self, g, i: int, kv, acts, n_tokens: int):
        """Layer i's first graph: attention and the residual into h, its norm into xn, then either
        the dense FFN and residual into x (returns None) or the router (returns ids, weights)."""
        x = acts.view(g, "x", n_tokens)
        out, h, xn, routed = self.layer_ops(g, i, kv, x)
        if routed is None:
            g.expand(g.cpy(out, x))
            return None
        g.expand(g.cpy(h, acts.view(g, "h", n_tokens)))
        g.expand(g.cpy(xn, acts.view(g, "xn", n_tokens)))
        return routed

    def new_kv(self, n_ctx: int, n_batch: int | None = None) -> KVCache:
        a = self.args
        return KVCache(self.backend, a.n_layers, n_ctx, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                       self.kv_type, n_batch, (a.head_dim,))

    def forward(self, tokens: list[int], kv: KVCache, start: int, all_logits: bool = False) -> torch.Tensor:
        """tokens at positions start.. -> logits [T, V] (or [1, V] for the last token)."""
        if self._runner is None:
            from edgemoe.forward import Runner

            self._runner = Runner(self, self.backend, self.n_batch, self.token_graph)
        return torch.from_numpy(self._runner.forward(tokens, kv, start, all_logits))

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The routed-expert blocks in layer order (dense FFN layers have none)."""
        return [b.moe for b in self.blocks if b.moe is not None]

    @functools.cached_property
    def layers(self) -> list[tuple]:
        """(attn_norm, attention, ffn_norm, ffn) per layer, norms as torch: the layer-by-layer tools."""
        f = functools.partial(tensor_f32, self.file)
        return [(f(f"blk.{i}.attn_norm.weight"), b.attn, f(f"blk.{i}.ffn_norm.weight"), b.ffn)
                for i, b in enumerate(self.blocks)]

    @functools.cached_property
    def norm(self) -> torch.Tensor:
        return tensor_f32(self.file, "output_norm.weight")

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        for b in self.moe_blocks:
            b.close()
        self.weights.close()
