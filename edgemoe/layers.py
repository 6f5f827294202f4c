"""Dense building blocks shared by the architecture modules, as ggml graph builders.

Each builder adds ops to a graph `g` (edgemoe.native.graph.Graph) and returns the result tensor;
shapes are ggml's order, an activation [D, T] is D values per token for T tokens. Weights are
the file's own bytes (edgemoe.native.weights.FileWeights), so every matmul is llama.cpp's kernel
on llama.cpp's bytes. The engine composes them into per-layer graphs (edgemoe/forward.py);
`eager` runs one builder once on torch inputs, for the layer-by-layer tools (calibration,
compression) that drive the dense path from torch.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.native import ops
from edgemoe.native.graph import Graph
from edgemoe.native.ops import Tensor


def norm(g, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS norm of each token's values times the norm weight. x: [n, T] -> [n, T]."""
    return g.mul(g.rms_norm(x, eps), weight)


def linear(g, weight: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """weight [in, out] (ggml ne; a GGUF [out, in] matrix), x [in, T] -> [out, T]."""
    y = g.mul_mat(weight, x)
    return g.add(y, bias) if bias is not None else y


def swiglu_ffn(g, gate: Tensor, up: Tensor, down: Tensor, x: Tensor) -> Tensor:
    """down(silu(gate x) * up x), llama.cpp's build_ffn with SILU and a parallel gate. x: [D, T] -> [D, T]."""
    return g.mul_mat(down, g.swiglu(g.mul_mat(gate, x), g.mul_mat(up, x)))


def attend(g, kv, layer: int, q: Tensor, k: Tensor, v: Tensor | None, v_dim: int, scale: float) -> Tensor:
    """Store this step's keys/values in the KV cache, then attend over the cached ones.

    q [dk, H, T], k [dk, Hkv, T], v [dv, Hkv, T] (None: V is K's first v_dim values, absorbed
    MLA) -> [dv, H, T]. GQA is the head broadcast of flash attention (f16 / q8_0 caches) or of
    ggml_mul_mat (f32 cache): no K/V copies."""
    dk, n_kv_heads, n_tokens = k.ne[0], k.ne[1], k.ne[2]
    rows = kv.rows(g)
    g.expand(g.set_rows(kv.k(layer), g.reshape(k if k.contiguous else g.cont(k), dk * n_kv_heads, n_tokens), rows))
    if v is not None:
        g.expand(g.set_rows(kv.v(layer), g.reshape(v if v.contiguous else g.cont(v), v_dim * n_kv_heads, n_tokens),
                            rows))
    keys = kv.keys(g, layer, dk, n_kv_heads)                  # [dk, n_kv, Hkv]
    values = kv.values(g, layer, v_dim, n_kv_heads)           # [dv, n_kv, Hkv]
    q = g.permute(q, 0, 2, 1, 3)                              # [dk, T, H]
    if kv.type != QT.F32:
        return g.flash_attn(q, keys, values, kv.mask(g), scale)
    # an f32 cache: llama.cpp's attention without flash attention, op for op (the reference mode)
    probs = g.soft_max_masked(g.mul_mat(keys, q), kv.mask(g), scale)                     # [n_kv, T, H]
    out = g.mul_mat(g.cont(g.permute(values, 1, 0, 2, 3)), probs)                        # [dv, T, H]
    return g.cont(g.permute(out, 0, 2, 1, 3))                                            # [dv, H, T]


def eager(backend, build, *inputs: torch.Tensor, max_tensors: int = 384) -> torch.Tensor:
    """build(g, *tensors) once on float32 inputs [T, n] (torch) -> [T, m] (torch), in a one-off graph."""
    with Graph(backend, label="dense", max_tensors=max_tensors) as g:
        tensors = []
        for x in inputs:
            a = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
            t = g.input(ops.F32, tuple(reversed(a.shape)))
            g.feed(t, a)
            tensors.append(t)
        out = build(g, *tensors)
        out = g.output(out if out.contiguous else g.cont(out))
        g.compute()
        return torch.from_numpy(g.read(out))


class Linear:
    """y = x W^T for a GGUF weight [out, in] (any type); called on torch [T, in] -> [T, out]."""

    def __init__(self, weights, name: str, backend, bias: str | None = None):
        self.weight = weights.matrix(name)
        self.bias = weights.get(bias) if bias else None
        self.in_features, self.out_features = self.weight.ne[0], self.weight.ne[1]
        self.backend = backend

    def build(self, g, x: Tensor) -> Tensor:
        return linear(g, self.weight, x, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return eager(self.backend, self.build, x)


class SwiGLU:
    """A dense SwiGLU FFN from blk.N.ffn_{gate,up,down}{suffix}.weight: DeepSeek's leading dense
    layers (suffix "") and shared experts of DeepSeek / Qwen2-MoE (suffix "_shexp")."""

    def __init__(self, weights, layer: int, backend, suffix: str = ""):
        p = f"blk.{layer}."
        self.gate, self.up, self.down = (weights.matrix(f"{p}ffn_{role}{suffix}.weight")
                                         for role in ("gate", "up", "down"))
        self.backend = backend

    def build(self, g, x: Tensor) -> Tensor:
        return swiglu_ffn(g, self.gate, self.up, self.down, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return eager(self.backend, self.build, x)


class Embedding:
    """Token embeddings: rows of the file's (quantized) table, dequantized by ggml_get_rows."""

    def __init__(self, weights, name: str, backend):
        self.table = weights[name]  # ne [D, vocab]
        self.dim, self.vocab = self.table.ne[0], self.table.ne[1]
        self.backend = backend

    def check(self, tokens) -> np.ndarray:
        """Token ids as int32 for ggml_get_rows, each checked against the vocabulary."""
        if len(tokens) == 1 and 0 <= tokens[0] < self.vocab:  # a decode step
            return np.array(tokens, dtype=np.int32)
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token id out of range 0..{self.vocab - 1}")
        return ids.astype(np.int32)

    def build(self, g, ids: Tensor) -> Tensor:
        return g.get_rows(self.table, ids)  # [D, T]

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        ids = self.check(tokens)
        with Graph(self.backend, label="dense") as g:
            t = g.input(ops.I32, (len(ids),))
            g.feed(t, ids)
            out = g.output(self.build(g, t))
            g.compute()
            return torch.from_numpy(g.read(out).reshape(len(ids), self.dim))


def tensor_f32(model: GGUFFile, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A small tensor (norm weight, bias, router) dequantized to float32 torch; `shape`: the one
    the model needs (a file that says otherwise is refused before any token runs)."""
    import gguf.quants

    info = model.tensors[name]
    if shape is not None and info.shape != shape:
        raise ModelFileError(f"{model.path}: {name} has shape {list(info.shape)}, the model needs {list(shape)}; "
                             "the file is corrupt, re-create it")
    raw = np.asarray(model.data(name))
    arr = gguf.quants.dequantize(raw, info.qtype) if info.qtype.name not in ("F32",) else raw.view(np.float32)
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(info.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's RMS norm for the tools that drive the dense path from torch (calibration, compression)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
