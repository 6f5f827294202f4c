"""Every tensor the dense path will use, checked against the file's hyper-parameters when a model
opens (`check_model`, called once by the engine before it builds anything).

ggml aborts the whole process on a failed assertion (a matmul whose widths disagree, a graph with
too many leaves) and segfaults on a weight type it cannot multiply; torch's shape errors name no
file. So each tensor's shape is derived here from the GGUF alone, its hyper-parameters and the
dims of its other tensors, as llama.cpp's loader requires them (create_tensor in llama-model.cpp,
per architecture), and compared with the file; its type with what the engine can read. A mismatch
is one ModelFileError naming the file, the tensor, its shape and the values it contradicts. This
is independent of how the engine builds its graphs: it states what a consistent file is.

Routed experts: edgemoe.expert_store checks the extended layout's per-expert shapes and types;
this module checks the stock layout's 3-D expert tensors, every router and the per-layer counts.
"""
from __future__ import annotations

import functools
import math

import gguf
import numpy as np

from edgemoe.gguf_file import VOCAB_KEY, GGUFFile, ModelFileError, TensorInfo
from edgemoe.layout import is_extended, read_layout
from edgemoe.native.ops import NO_MATMUL

_FIX = "the file is corrupt or its metadata was edited; re-create it with `edgemoe convert`"


@functools.cache
def _dequantizable(qtype) -> bool:
    """Norms, biases, routers and embedding rows are widened with gguf-py, which lacks some types."""
    _, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros(type_bytes, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class _Check:
    """Reads hyper-parameters and compares tensors for one file; every failure names the file."""

    def __init__(self, m: GGUFFile):
        self.m, self.arch = m, m.arch

    def error(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.m.path}: {what}")

    def int(self, name: str, default: int | None = None, low: int = 1) -> int:
        """A whole-number hyper-parameter `{arch}.{name}` >= low."""
        value = self.m.arch_field(name, default)
        if value is None:
            raise self.error(f"lacks metadata key '{self.arch}.{name}'; re-create it with `edgemoe convert`")
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value < low):
            raise self.error(f"{self.arch}.{name} = {value!r} is not a whole number >= {low}; {_FIX}")
        return int(value)

    def tensor(self, name: str, shapes, why: str, required: bool = True, matmul: bool = True,
               dequantized: bool = False) -> TensorInfo | None:
        """Tensor `name` with one of `shapes` (numpy order; one tuple or a list of them); `why`
        says where each dim comes from. matmul: ggml multiplies it; dequantized: gguf-py widens it."""
        info = self.m.tensors.get(name)
        if info is None:
            if required:
                raise self.error(f"lacks tensor {name!r} ({why}); the file is incomplete or not for this architecture, "
                                 "re-create it with `edgemoe convert`")
            return None
        shapes = [tuple(shapes)] if isinstance(shapes, tuple) else [tuple(s) for s in shapes]
        if info.shape not in shapes:
            want = " or ".join(str(list(s)) for s in shapes)
            raise self.error(f"tensor {name} has shape {list(info.shape)}, but the file's hyper-parameters give {want} "
                             f"({why}); {_FIX}")
        if matmul and info.qtype in NO_MATMUL or dequantized and not _dequantizable(info.qtype):
            raise self.error(f"tensor {name} has type {info.qtype.name}, which the edgemoe engine cannot "
                             f"{'multiply' if matmul and info.qtype in NO_MATMUL else 'read'} (not a weight type); {_FIX}")
        return info

    def vector(self, name: str, n: int, why: str, required: bool = True) -> None:
        self.tensor(name, (n,), why, required, matmul=False, dequantized=True)

    def width(self, name: str, axis: int, ndim: int) -> int:
        """A dim read from the tensor itself (an FFN width no hyper-parameter fixes), after checking
        the tensor has `ndim` dims; the caller then checks its full shape."""
        info = self.m.tensors.get(name)
        if info is None:
            raise self.error(f"lacks tensor {name!r}; the file is incomplete or not for this architecture, "
                             "re-create it with `edgemoe convert`")
        if len(info.shape) != ndim:
            raise self.error(f"tensor {name} has shape {list(info.shape)}; it must have {ndim} dims; {_FIX}")
        return info.shape[axis]


def check_model(m: GGUFFile) -> None:
    """Raise ModelFileError unless the engine runs the file's architecture and every dense tensor it
    uses matches the file's hyper-parameters."""
    arch = m.arch
    if arch not in _ATTENTION:
        raise ModelFileError(f"{m.path}: architecture {arch!r} is not one the edgemoe engine runs "
                             f"({', '.join(sorted(_ATTENTION))}); run it with --backend llama")
    c = _Check(m)
    hidden, n_layers = c.int("embedding_length"), c.int("block_count")
    _vocab(c, hidden)
    counts, where = _expert_counts(c, n_layers)
    top_k = c.int("expert_used_count")
    dense_lead = c.int("leading_dense_block_count", 0, low=0) if arch == "deepseek2" else 0
    attention = _ATTENTION[arch](c, hidden)
    for layer in range(n_layers):
        p = f"blk.{layer}."
        c.vector(p + "attn_norm.weight", hidden, f"embedding_length {hidden}")
        c.vector(p + "ffn_norm.weight", hidden, f"embedding_length {hidden}")
        attention(layer)
        if layer < dense_lead:
            _swiglu(c, p, "", hidden)
            continue
        _moe(c, layer, counts[layer], where, top_k, hidden)
        if arch == "qwen2moe":
            c.tensor(p + "ffn_gate_inp_shexp.weight", [(hidden,), (1, hidden)],
                     f"the shared expert's gate: embedding_length {hidden}", matmul=False, dequantized=True)
        if arch in ("qwen2moe", "deepseek2"):
            _swiglu(c, p, "_shexp", hidden)


def _vocab(c: _Check, hidden: int) -> None:
    """Embeddings and output rows: one per vocabulary token (a token id past them would index out
    of the table, and a sampled id past the vocabulary would reach llama.cpp's detokenizer)."""
    n_vocab = c.m.array_length(VOCAB_KEY)
    if n_vocab is not None:
        source = VOCAB_KEY
    else:
        n_vocab, source = c.width("token_embd.weight", 0, 2), "token_embd.weight"
    has_output = "output.weight" in c.m.tensors
    why = f"[vocabulary {n_vocab} ({source}), embedding_length {hidden}]"
    c.tensor("token_embd.weight", (n_vocab, hidden), why, matmul=not has_output, dequantized=True)
    c.tensor("output.weight", (n_vocab, hidden), why, required=False)
    c.vector("output_norm.weight", hidden, f"embedding_length {hidden}")


def _expert_counts(c: _Check, n_layers: int) -> tuple[list[int], str]:
    """Routed experts per layer: the extended layout's table, else {arch}.expert_count everywhere."""
    n_experts = c.m.arch_field("expert_count")
    if n_experts in (None, 0):
        raise c.error(f"has no experts ({c.arch}.expert_count = {n_experts}); the edgemoe engine runs MoE models, "
                      "run a dense model with --backend llama")
    n_experts = c.int("expert_count")
    if is_extended(c.m):
        return list(read_layout(c.m).expert_counts), "edgemoe.expert_counts"
    return [n_experts] * n_layers, f"{c.arch}.expert_count"


def _moe(c: _Check, layer: int, n: int, where: str, top_k: int, hidden: int) -> None:
    p = f"blk.{layer}."
    if n < top_k:
        raise c.error(f"layer {layer} has {n} routed experts ({where}), fewer than the {top_k} each token is routed "
                      f"to ({c.arch}.expert_used_count); {_FIX}")
    c.tensor(p + "ffn_gate_inp.weight", (n, hidden), f"the router: [experts {n} ({where}), embedding_length {hidden}]",
             matmul=False, dequantized=True)
    if is_extended(c.m):
        # per-expert tensors: edgemoe.expert_store checks each shape against embedding_length and
        # its type against the layout's table; whether ggml can multiply that type is checked here
        for name, info in c.m.tensors.items():
            if name.startswith(p + "expert.") and info.qtype in NO_MATMUL:
                raise c.error(f"tensor {name} has type {info.qtype.name}, which the edgemoe engine cannot multiply "
                              f"(not a weight type); {_FIX}")
        return
    ffn = c.width(p + "ffn_gate_exps.weight", 1, 3)
    why = f"experts {n} ({where}), expert FFN width {ffn} (ffn_gate_exps), embedding_length {hidden}"
    for role in ("gate", "up"):
        c.tensor(f"{p}ffn_{role}_exps.weight", (n, ffn, hidden), f"[{why}]")
    c.tensor(p + "ffn_down_exps.weight", (n, hidden, ffn), f"[{why}]")


def _swiglu(c: _Check, p: str, suffix: str, hidden: int) -> None:
    """A dense SwiGLU FFN (DeepSeek's leading layers, shared experts): gate, up [F, D], down [D, F]."""
    ffn = c.width(f"{p}ffn_gate{suffix}.weight", 0, 2)
    why = f"FFN width {ffn} (ffn_gate{suffix}), embedding_length {hidden}"
    c.tensor(f"{p}ffn_gate{suffix}.weight", (ffn, hidden), why)
    c.tensor(f"{p}ffn_up{suffix}.weight", (ffn, hidden), why)
    c.tensor(f"{p}ffn_down{suffix}.weight", (hidden, ffn), why)


def _heads(c: _Check, hidden: int) -> tuple[int, int]:
    """head_count and the per-head key width's default (embedding_length / head_count)."""
    n_heads = c.int("attention.head_count")
    if hidden < n_heads:
        raise c.error(f"{c.arch}.attention.head_count = {n_heads} exceeds {c.arch}.embedding_length = {hidden}; "
                      f"{_FIX}")
    return n_heads, hidden // n_heads


def _rope(c: _Check, head_dim: int) -> int:
    """rope.dimension_count: even (rotated in pairs), 2 up to a head's dims (0 made ggml's rope hang)."""
    rope = c.int("rope.dimension_count", head_dim, low=0)
    if rope % 2 or not 2 <= rope <= head_dim:
        raise c.error(f"{c.arch}.rope.dimension_count = {rope} must be even, at least 2 and at most the {head_dim} "
                      f"dims of a head; {_FIX}")
    return rope


def _gqa_attention(c: _Check, hidden: int):
    """llama (Mixtral), qwen2moe, olmoe, qwen3moe: grouped-query attention, optional q/k/v biases
    and q/k norms (per head, or over the whole projection as OLMoE's)."""
    n_heads, default_dim = _heads(c, hidden)
    n_kv = c.int("attention.head_count_kv", n_heads)
    if n_heads % n_kv:
        raise c.error(f"{c.arch}.attention.head_count = {n_heads} is not a multiple of "
                      f"{c.arch}.attention.head_count_kv = {n_kv} (grouped-query attention); {_FIX}")
    k_dim = c.int("attention.key_length", default_dim)
    v_dim = c.int("attention.value_length", k_dim)
    if v_dim != k_dim:
        raise c.error(f"{c.arch}.attention.value_length = {v_dim} differs from attention.key_length = {k_dim}, "
                      "which the edgemoe engine does not support for this architecture; run it with --backend llama")
    _rope(c, k_dim)
    q, kv = f"head_count {n_heads} x key_length {k_dim}", f"head_count_kv {n_kv} x key_length {k_dim}"

    def check(layer: int) -> None:
        p = f"blk.{layer}."
        c.tensor(p + "attn_q.weight", (n_heads * k_dim, hidden), f"[{q}, embedding_length {hidden}]")
        c.tensor(p + "attn_k.weight", (n_kv * k_dim, hidden), f"[{kv}, embedding_length {hidden}]")
        c.tensor(p + "attn_v.weight", (n_kv * v_dim, hidden), f"[{kv}, embedding_length {hidden}]")
        c.tensor(p + "attn_output.weight", (hidden, n_heads * v_dim), f"[embedding_length {hidden}, {q}]")
        c.vector(p + "attn_q.bias", n_heads * k_dim, q, required=False)
        c.vector(p + "attn_k.bias", n_kv * k_dim, kv, required=False)
        c.vector(p + "attn_v.bias", n_kv * v_dim, kv, required=False)
        c.tensor(p + "attn_q_norm.weight", [(k_dim,), (n_heads * k_dim,)], f"key_length {k_dim} or {q}",
                 required=False, matmul=False, dequantized=True)
        c.tensor(p + "attn_k_norm.weight", [(k_dim,), (n_kv * k_dim,)], f"key_length {k_dim} or {kv}",
                 required=False, matmul=False, dequantized=True)
    return check


def _mla_attention(c: _Check, hidden: int):
    """deepseek2: multi-head latent attention. q (plain, or low-rank with its own norm) is
    [nope + rope] per head; kv_a gives the latent [kv_lora] and the shared rope key; attn_k_b /
    attn_v_b (absorbed) or the fused attn_kv_b (legacy) map per head to and from the latent."""
    a = c.arch
    n_heads, default_dim = _heads(c, hidden)
    plain_k = c.int("attention.key_length", default_dim)
    mla = bool(c.m.arch_field("attention.key_length_mla") and c.m.arch_field("attention.value_length_mla"))
    if mla:
        k_dim, v_dim = c.int("attention.key_length_mla"), c.int("attention.value_length_mla")
        k_name = "key_length_mla"
    else:
        k_dim, v_dim, k_name = plain_k, c.int("attention.value_length", plain_k), "key_length"
    rope = c.int("rope.dimension_count", plain_k, low=0)
    if rope % 2 or not 0 < rope < k_dim:
        raise c.error(f"{a}.rope.dimension_count = {rope} must be even and below {a}.attention.{k_name} = {k_dim} "
                      f"(each head's key is {k_dim - rope} dims without RoPE + {rope} with); {_FIX}")
    nope, lora = k_dim - rope, c.int("attention.kv_lora_rank")
    q_lora = c.int("attention.q_lora_rank", 0, low=0)
    heads = f"head_count {n_heads}"
    q_why = f"{heads} x {k_name} {k_dim}"
    nope_why = f"{k_name} {k_dim} - rope.dimension_count {rope}"

    def check(layer: int) -> None:
        p = f"blk.{layer}."
        if p + "attn_q.weight" in c.m.tensors:
            c.tensor(p + "attn_q.weight", (n_heads * k_dim, hidden), f"[{q_why}, embedding_length {hidden}]")
        else:
            rank = q_lora or c.width(p + "attn_q_a.weight", 0, 2)
            c.tensor(p + "attn_q_a.weight", (rank, hidden), f"[q_lora_rank {rank}, embedding_length {hidden}]")
            c.vector(p + "attn_q_a_norm.weight", rank, f"q_lora_rank {rank}")
            c.tensor(p + "attn_q_b.weight", (n_heads * k_dim, rank), f"[{q_why}, q_lora_rank {rank}]")
        c.tensor(p + "attn_kv_a_mqa.weight", (lora + rope, hidden),
                 f"[kv_lora_rank {lora} + rope.dimension_count {rope}, embedding_length {hidden}]")
        c.vector(p + "attn_kv_a_norm.weight", lora, f"kv_lora_rank {lora}")
        if mla:
            c.tensor(p + "attn_k_b.weight", (n_heads, lora, nope), f"[{heads}, kv_lora_rank {lora}, {nope_why}]")
            c.tensor(p + "attn_v_b.weight", (n_heads, v_dim, lora),
                     f"[{heads}, value_length_mla {v_dim}, kv_lora_rank {lora}]")
        else:
            c.tensor(p + "attn_kv_b.weight", (n_heads * (nope + v_dim), lora),
                     f"[{heads} x ({nope_why} + value_length {v_dim}), kv_lora_rank {lora}]")
        c.tensor(p + "attn_output.weight", (hidden, n_heads * v_dim),
                 f"[embedding_length {hidden}, {heads} x value length {v_dim}]")
    return check


_ATTENTION = {"llama": _gqa_attention, "qwen2moe": _gqa_attention, "olmoe": _gqa_attention,
              "qwen3moe": _gqa_attention, "deepseek2": _mla_attention}
