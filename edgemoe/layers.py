"""Dense building blocks shared by the architecture modules.

Large matmuls run through ggml on the file's own quantized bytes (`QLinear`); torch does the
small per-token math (norms, RoPE, attention over the KV cache, routing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.native.backend import CpuBackend
from edgemoe.native.tensors import ALIGNMENT, Graph, Weight, aligned_empty


class QLinear:
    """y = x @ W.T for a GGUF weight [out, in] in any ggml type, computed by ggml in place."""

    def __init__(self, model: GGUFFile, name: str, backend: CpuBackend, bias: str | None = None):
        info = model.tensors[name]
        if len(info.shape) != 2:
            raise ValueError(f"{name} has shape {info.shape}; QLinear needs a 2-D weight")
        self.out_features, self.in_features = info.shape
        self.weight = Weight(model.data(name), info.qtype, self.out_features, self.in_features, name=name)
        self.backend = backend
        self.bias = tensor_f32(model, bias) if bias and bias in model.tensors else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        with Graph(self.backend, label="dense") as g:
            (y,) = g.compute([(g.matmul(self.weight, g.input(x.numpy())), (x.shape[0], self.out_features))])
        out = torch.from_numpy(y)
        return out + self.bias if self.bias is not None else out


def project(linears: list["QLinear"], x: torch.Tensor) -> list[torch.Tensor]:
    """Several projections of the same input in one ggml graph (one thread-pool wake-up instead
    of one per matrix: q/k/v of a decode step). x: [T, in] -> [[T, out_i]]."""
    backend = linears[0].backend
    with Graph(backend, label="dense") as g:
        xin = g.input(x.numpy())
        ys = g.compute([(g.matmul(lin.weight, xin), (x.shape[0], lin.out_features)) for lin in linears])
    return [torch.from_numpy(y) + lin.bias if lin.bias is not None else torch.from_numpy(y)
            for y, lin in zip(ys, linears)]


class Embedding:
    """Token embeddings read row by row from the file's quantized bytes (never widened whole:
    a Mixtral embedding table in f32 would be 0.5 GB)."""

    def __init__(self, model: GGUFFile, name: str):
        import gguf

        info = model.tensors[name]
        self.vocab, self.dim = info.shape
        self.qtype = info.qtype
        self.row_bytes = info.nbytes // self.vocab
        self.rows = np.asarray(model.data(name)).reshape(self.vocab, self.row_bytes)
        self._dequantize = gguf.quants.dequantize

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token id out of range 0..{self.vocab - 1}")
        raw = self.rows[ids]  # [T, row_bytes]
        if self.qtype.name == "F32":
            out = raw.view(np.float32)
        else:
            out = self._dequantize(raw, self.qtype)
        return torch.from_numpy(np.array(out, dtype=np.float32).reshape(len(tokens), self.dim))


class HeadLinear:
    """y[:, h] = x[:, h] @ W[h].T for a 3-D GGUF weight [H, out, in] (ggml's mul_mat batched over
    heads), each head on the file's quantized bytes: DeepSeek's attn_k_b / attn_v_b."""

    def __init__(self, model: GGUFFile, name: str, backend: CpuBackend):
        info = model.tensors[name]
        if len(info.shape) != 3:
            raise ValueError(f"{name} has shape {info.shape}; HeadLinear needs a 3-D weight [heads, out, in]")
        n_heads, self.out_features, self.in_features = info.shape
        raw, per = model.data(name), info.nbytes // n_heads
        self.weights = []
        for h in range(n_heads):
            part = raw[h * per:(h + 1) * per]
            if part.ctypes.data % ALIGNMENT:  # ggml wants aligned bytes; heads are small, copy them
                part = aligned_empty(per)
                part[:] = raw[h * per:(h + 1) * per]
            self.weights.append(Weight(part, info.qtype, self.out_features, self.in_features, name=f"{name}[{h}]"))
        self.backend = backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H, in] -> [T, H, out]
        T = x.shape[0]
        with Graph(self.backend, label="dense") as g:
            ys = g.compute([(g.matmul(w, g.input(x[:, h].numpy())), (T, self.out_features))
                            for h, w in enumerate(self.weights)])
        return torch.from_numpy(np.stack(ys, axis=1))


def swiglu_ffn(backend: CpuBackend, gate: Weight, up: Weight, down: Weight, x: torch.Tensor,
               label: str = "dense") -> torch.Tensor:
    """down(silu(gate x) * up x) in one ggml graph, as llama.cpp's build_ffn/build_moe_ffn (SILU,
    parallel gate). x: [T, D] -> [T, D_out]."""
    with Graph(backend, label=label) as g:
        xin = g.input(x.numpy())
        h = g.swiglu(g.matmul(gate, xin), g.matmul(up, xin))   # [T, F]
        (y,) = g.compute([(g.matmul(down, h), (x.shape[0], down.rows))])
    return torch.from_numpy(y)


class SwiGLU:
    """A dense SwiGLU FFN from blk.N.ffn_{gate,up,down}{suffix}.weight: DeepSeek's leading dense
    layers (suffix "") and shared experts of DeepSeek / Qwen2-MoE (suffix "_shexp")."""

    def __init__(self, model: GGUFFile, layer: int, backend: CpuBackend, suffix: str = ""):
        p = f"blk.{layer}."
        self.gate, self.up, self.down = (QLinear(model, f"{p}ffn_{role}{suffix}.weight", backend)
                                         for role in ("gate", "up", "down"))
        self.backend = backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_ffn(self.backend, self.gate.weight, self.up.weight, self.down.weight, x)


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
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-norm of q or k, x: [T, H, d]. A weight of d values normalises each head (Qwen3);
    one of H*d values normalises the whole projection before the head split (OLMoE)."""
    if weight.shape[-1] == x.shape[-1]:
        return rms_norm(x, weight, eps)
    return rms_norm(x.reshape(x.shape[0], -1), weight, eps).view_as(x)


def rope_freqs(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


@dataclass(frozen=True)
class YaRN:
    """ggml_rope_ext's YaRN inputs (ext_factor 1): positions interpolated by freq_scale on the
    low-frequency dims, extrapolated on the high ones, with a linear ramp over dims
    [corr_low, corr_high] between (ggml_rope_yarn_corr_dims); cos/sin scaled by `mscale`."""
    freq_scale: float  # 1 / rope.scaling.factor
    corr_low: float
    corr_high: float
    mscale: float

    @classmethod
    def from_ggml(cls, n_rot: int, base: float, freq_scale: float, n_ctx_orig: int, beta_fast: float,
                  beta_slow: float, attn_factor: float) -> "YaRN":
        def corr_dim(beta: float) -> float:
            return n_rot * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(0.0, math.floor(corr_dim(beta_fast))), min(n_rot - 1.0, math.ceil(corr_dim(beta_slow)))
        return cls(freq_scale, low, high, attn_factor * (1 + 0.1 * math.log(1 / freq_scale)))


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, neox: bool,
               yarn: YaRN | None = None) -> torch.Tensor:
    """x: [T, H, d] rotated on its first 2*len(freqs) dims. neox: pairs (i, i+d/2) as HF's
    rotate_half; otherwise interleaved pairs (2i, 2i+1) as llama.cpp's `llama` arch."""
    n_rot = 2 * freqs.shape[0]
    angles = pos.to(torch.float64)[:, None] * freqs[None, :]  # [T, n_rot/2]
    if yarn is None:
        cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]
    else:  # ggml's rope_yarn with ext_factor 1
        ramp = 1 - ((torch.arange(n_rot // 2, dtype=torch.float64) - yarn.corr_low)
                    / max(0.001, yarn.corr_high - yarn.corr_low)).clamp(0, 1)  # [n_rot/2], 1 = extrapolate
        angles = angles * yarn.freq_scale * (1 - ramp) + angles * ramp
        cos = (angles.cos() * yarn.mscale).float()[:, None, :]
        sin = (angles.sin() * yarn.mscale).float()[:, None, :]
    xr, rest = x[..., :n_rot], x[..., n_rot:]
    if neox:
        a, b = xr[..., : n_rot // 2], xr[..., n_rot // 2:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


class KVCache:
    """Per-layer keys/values: [n_ctx, n_kv_heads, head_dim] float32, filled up to `length`."""

    def __init__(self, n_layers: int, n_ctx: int, n_kv_heads: int, k_dim: int, v_dim: int):
        self.k = [torch.zeros(n_ctx, n_kv_heads, k_dim) for _ in range(n_layers)]
        self.v = [torch.zeros(n_ctx, n_kv_heads, v_dim) for _ in range(n_layers)]
        self.n_ctx, self.length = n_ctx, 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in self.k + self.v)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[0]
        if end > self.n_ctx:
            raise ValueError(f"context full: {end} tokens > n_ctx {self.n_ctx}; start a new chat or raise --ctx")
        self.k[layer][start:end] = k
        self.v[layer][start:end] = v
        return self.k[layer][:end], self.v[layer][:end]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q: [T, H, dk], k: [S, Hkv, dk], v: [S, Hkv, dv] with S = start + T (causal) -> [T, H*dv]."""
    T, H, _ = q.shape
    S, Hkv, dv = v.shape
    group = H // Hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale  # [H, T, S]
    mask = torch.arange(S)[None, :] > (start + torch.arange(T))[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, v).reshape(T, H * dv)
