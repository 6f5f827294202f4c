"""The KV cache in ggml tensors (f16 by default, as llama.cpp's), and the per-step inputs every
layer's attention reads: positions, the cache rows to write, the causal mask.

Layout per layer, as llama.cpp's with flash attention: K [k_row, n_ctx] and V [v_row, n_ctx]
(one row per position: all KV heads of a token), neither transposed. A graph writes a step's
rows with ggml_set_rows at the row indices given as an input, so a decode graph is reused
unchanged from token to token; attention reads the first n_kv rows (n_kv: the filled length
rounded up to a bucket, so a graph is rebuilt only every `KV_BUCKET` tokens) with the rest masked.
DeepSeek's absorbed MLA caches one row of [latent, rope key] per token and reads V as a view of
K's first `latent` values (`v_row=None`).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.native import ops
from edgemoe.native.buffers import Buffer
from edgemoe.native.ops import Ops, Tensor

KV_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}
KV_BUCKET = 256  # rows attention reads: filled length rounded up to this (llama.cpp pads n_kv to 256 too)


def parse_kv_type(name: str) -> QT:
    try:
        return KV_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"KV cache type {name!r} is not one of {', '.join(KV_TYPES)}") from None


class KVCache:
    def __init__(self, backend, n_layers: int, n_ctx: int, k_row: int, v_row: int | None, kv_type: str = "f16",
                 n_batch: int | None = None, head_dims: tuple[int, ...] = ()):
        """k_row/v_row: values per position (heads x head width); v_row None: V is a view of K.
        n_batch: most tokens one step writes (default n_ctx). head_dims: widths each head view has,
        which a block-quantized type must divide."""
        self.type = parse_kv_type(kv_type)
        block = ops.lib().ggml_blck_size(int(self.type))
        for width in (k_row, v_row or k_row, *head_dims):
            if width % block:
                raise ValueError(f"a {self.type.name} KV cache needs head widths that are multiples of {block}; "
                                 f"this model has {width}: use --kv-type f16 or f32")
        self.n_layers, self.n_ctx, self.k_row, self.v_row = n_layers, n_ctx, k_row, v_row
        self.n_batch = min(n_batch or n_ctx, n_ctx)
        t = int(self.type)
        shapes = {f"k{i}": (t, (k_row, n_ctx)) for i in range(n_layers)}
        if v_row is not None:
            shapes.update({f"v{i}": (t, (v_row, n_ctx)) for i in range(n_layers)})
        self.store = Buffer(backend, shapes)
        # per-step inputs shared by every layer's graph; the mask is [T, n_kv] f16, packed from the start
        self.steps = Buffer(backend, {"pos": (ops.I32, (self.n_batch,)), "rows": (ops.I64, (self.n_batch,)),
                                      "mask": (ops.F16, (n_ctx * self.n_batch,))})
        self._pos, self._rows = np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int64)
        self._mask_row = np.zeros(n_ctx, dtype=np.float16)
        self.graphs: dict[tuple, tuple] = {}  # decode graphs bound to this cache: key -> (graph, outputs)
        self.lib = ops.lib()
        self.nbytes = self.store.nbytes + self.steps.nbytes  # K/V, and the step inputs (the mask: n_ctx x n_batch)
        self.start, self.n_tokens, self.n_kv = 0, 0, 0

    def k(self, layer: int) -> Tensor:
        return self.store[f"k{layer}"]

    def v(self, layer: int) -> Tensor | None:
        return self.store[f"v{layer}"] if self.v_row is not None else None

    def kv_rows(self, end: int) -> int:
        """Rows attention reads when positions < end are filled."""
        return min(self.n_ctx, -(-end // KV_BUCKET) * KV_BUCKET)

    def set_step(self, start: int, n_tokens: int) -> None:
        """The next graphs write positions start..start+n_tokens-1 and attend causally to all before."""
        end = start + n_tokens
        if end > self.n_ctx:
            raise ValueError(f"context full: {end} tokens > n_ctx {self.n_ctx}; start a new chat or raise --ctx")
        if n_tokens > self.n_batch:
            raise ValueError(f"a step of {n_tokens} tokens exceeds this KV cache's batch of {self.n_batch}")
        n_kv = self.kv_rows(end)
        if n_tokens == 1:  # decode: one mask row, no temporaries
            pos, rows, mask = self._pos[:1], self._rows[:1], self._mask_row[:n_kv]
            pos[0] = rows[0] = start
            mask[:end] = 0.0
            mask[end:] = -np.inf
        else:
            pos = np.arange(start, end, dtype=np.int32)
            rows = pos.astype(np.int64)
            mask = np.full((n_tokens, n_kv), -np.inf, dtype=np.float16)
            mask[np.arange(n_kv)[None, :] <= pos[:, None]] = 0.0
        for name, array in (("pos", pos), ("rows", rows), ("mask", mask)):
            self.lib.ggml_backend_tensor_set(self.steps[name].ptr, array.ctypes.data, 0, array.nbytes)
        if n_kv != self.n_kv:  # decode graphs of another bucket are rebuilt when it comes back: keep one bucket's
            for key in [key for key in self.graphs if key[1] != n_kv]:
                self.graphs.pop(key)[0].close()
        self.start, self.n_tokens, self.n_kv = start, n_tokens, n_kv

    # ---- views a graph reads (built into graph `g` for the current step's shape) -------------
    def pos(self, g: Ops) -> Tensor:
        return g.view_1d(self.steps["pos"], self.n_tokens)

    def rows(self, g: Ops) -> Tensor:
        return g.view_1d(self.steps["rows"], self.n_tokens)

    def mask(self, g: Ops) -> Tensor:
        return g.view_2d(self.steps["mask"], self.n_kv, self.n_tokens, 2 * self.n_kv)

    def keys(self, g: Ops, layer: int, head_dim: int, n_heads: int) -> Tensor:
        """[head_dim, n_kv, n_heads] view of the cached keys (for ggml_flash_attn_ext)."""
        k, row = self.k(layer), self.lib.ggml_row_size(int(self.type), head_dim)
        view = g.view_3d(k, head_dim, n_heads, self.n_kv, row, k.nb[1])
        return g.permute(view, 0, 2, 1, 3)

    def values(self, g: Ops, layer: int, head_dim: int, n_heads: int) -> Tensor:
        """[head_dim, n_kv, n_heads] view of the cached values (MLA: K's first head_dim values)."""
        v = self.v(layer)
        if v is None:
            v = self.k(layer)
        view = g.view_3d(v, head_dim, n_heads, self.n_kv, self.lib.ggml_row_size(int(self.type), head_dim), v.nb[1])
        return g.permute(view, 0, 2, 1, 3)

    def close(self) -> None:
        for graph, _ in self.graphs.values():
            graph.close()
        self.graphs.clear()
        self.store.close()
        self.steps.close()
