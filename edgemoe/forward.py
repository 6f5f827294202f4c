"""A forward pass as llama.cpp builds it, per layer at most two graph computes: (a) norm, q/k/v,
RoPE, attention over the KV cache, output projection, residual, norm and router; (b) once the
cache has made the chosen experts resident, the experts (edgemoe.moe), shared expert and
residual. Around them: the token embedding and the output head.

Tensors that flow between a layer's graphs live in one buffer (`Activations`): x (the residual
stream), h (after attention), xn (the MoE input) and y (per (token, slot) expert outputs).
Decode graphs (one token) are built once and reused with new inputs: the layer graphs per KV
length bucket (kept in the KV cache they read), the expert graphs per arena mix (in the MoE
block), embedding and head here; they read a one-token buffer. Prefill runs in chunks of
`n_batch` tokens with one-off graphs over a buffer sized for its chunks, freed after it with the
graphs' scratch memory, so a short prompt costs little memory and a long one only while it runs.
"""
from __future__ import annotations

import ctypes

import numpy as np

from edgemoe.layers import norm
from edgemoe.native import ops
from edgemoe.native.buffers import Buffer
from edgemoe.native.graph import Graph
from edgemoe.native.ops import Tensor
from edgemoe.token_graph import TokenGraphs


class Activations:
    def __init__(self, backend, dim: int, top_k: int, n_batch: int):
        self.dim, self.n_batch = dim, n_batch
        shape = (ops.F32, (dim, n_batch))
        self.buffer = Buffer(backend, {"x": shape, "h": shape, "xn": shape,
                                       "y": (ops.F32, (dim, max(top_k, 1) * n_batch))})
        self.lib = ops.lib()
        self.graphs: dict[tuple, tuple] = {}  # graphs over this buffer shared by every layer (edgemoe.moe)

    def view(self, g, name: str, n: int) -> Tensor:
        """The first n columns ([D, n]) of buffer tensor `name`."""
        return g.view_2d(self.buffer[name], self.dim, n, 4 * self.dim)

    def read(self, name: str, n: int) -> np.ndarray:
        """float32 [n, D] copy of the first n columns."""
        out = np.empty((n, self.dim), dtype=np.float32)
        self.lib.ggml_backend_tensor_get(self.buffer[name].ptr, ctypes.c_void_p(out.ctypes.data), 0, out.nbytes)
        return out

    def close(self) -> None:
        for g, _ in self.graphs.values():
            g.close()
        self.graphs.clear()
        self.buffer.close()


class Runner:
    """Runs `model` (an edgemoe.arch model) over tokens with a KV cache (edgemoe.kv_cache.KVCache)."""

    def __init__(self, model, backend, n_batch: int, token_graph: bool = True):
        self.model, self.backend, self.n_batch = model, backend, n_batch
        self.top_k = max((b.cfg.top_k for b in model.moe_blocks), default=1)
        self.decode_acts = Activations(backend, model.args.hidden_size, self.top_k, 1)  # read by the kept graphs
        self._graphs: dict[tuple, tuple] = {}  # decode embedding / head graphs
        self.token_graphs = TokenGraphs(self) if token_graph else None  # decode as one graph when all are resident

    def forward(self, tokens: list[int], kv, start: int, all_logits: bool = False) -> np.ndarray:
        """tokens at positions start.. -> logits [T, V] (or [1, V] for the last token)."""
        ids = self.model.embed.check(tokens)
        if len(ids) == 0:
            raise ValueError("no tokens to run")
        out = []
        step = min(self.n_batch, kv.n_batch, len(ids))
        # a prefill's activations and graph memory are sized for its chunks and freed after it
        acts = self.decode_acts if step == 1 else Activations(self.backend, self.model.args.hidden_size, self.top_k,
                                                               step)
        try:
            if self.token_graphs and len(ids) == 1 and not all_logits:  # one graph if every expert is resident
                logits = self.token_graphs.forward(ids, kv, start)
                if logits is not None:
                    return logits
            for b0 in range(0, len(ids), step):
                chunk = ids[b0:b0 + step]
                n = len(chunk)
                kv.set_step(start + b0, n)
                self._embed(acts, chunk)
                for i in range(len(self.model.blocks)):
                    self._layer(acts, i, kv, n)
                if all_logits or b0 + n >= len(ids):
                    out.append(self._head(acts, n, all_logits))
        finally:
            if acts is not self.decode_acts:
                acts.close()
                self.backend.reset_scratch()
        return np.concatenate(out)

    def _cached(self, store: dict, key: tuple, build):
        entry = store.get(key)
        if entry is None:
            entry = build()
            if key[-1] == 1:  # decode graphs (one token) are kept; prefill graphs are one-off
                store[key] = entry
        return entry

    def embed_ops(self, g, acts: Activations, n: int) -> Tensor:
        """Token ids input i32 [n] -> their embeddings into x; returns the input."""
        t = g.input(ops.I32, (n,))
        g.expand(g.cpy(self.model.embed.build(g, t), acts.view(g, "x", n)))
        return t

    def head_ops(self, g, acts: Activations, n: int, n_out: int) -> Tensor:
        """Logits [V, n_out] of the last n_out of x's n columns (an output of g)."""
        x = acts.view(g, "x", n)
        if n_out < n:  # the last token only
            x = g.view_2d(acts.buffer["x"], x.ne[0], 1, 4 * x.ne[0], 4 * x.ne[0] * (n - 1))
        return self.head_of(g, x)

    def head_of(self, g, x: Tensor) -> Tensor:
        """Logits [V, n] of x [D, n] (an output of g)."""
        m = self.model
        return g.output(m.output.build(g, norm(g, x, m.norm_weight, m.args.eps)))

    def _embed(self, acts: Activations, ids: np.ndarray) -> None:
        n = len(ids)

        def build():
            g = Graph(self.backend, label="dense", reuse=n == 1)
            return g, self.embed_ops(g, acts, n)

        g, t = self._cached(self._graphs, ("embed", n), build)
        g.feed(t, ids)
        g.compute()
        if n > 1:
            g.close()

    def _head(self, acts: Activations, n: int, all_logits: bool) -> np.ndarray:
        n_out = n if all_logits else 1

        def build():
            g = Graph(self.backend, label="dense", reuse=n == 1)
            return g, self.head_ops(g, acts, n, n_out)

        g, logits = self._cached(self._graphs, ("head", n_out, n), build)
        g.compute()
        out = g.read(logits, np.empty((n_out, logits.ne[0]), dtype=np.float32))
        if n > 1:
            g.close()
        return out

    def _layer(self, acts: Activations, i: int, kv, n: int) -> None:
        block = self.model.blocks[i]

        def build():
            g = Graph(self.backend, label="dense", reuse=n == 1)
            routed = self.model.build_layer(g, i, kv, acts, n)
            if not routed:
                return g, ()
            ids, weights = (g.output(t) for t in routed)  # [k, T] each, read into [T, k]
            k = ids.ne[0]
            return g, ((ids, np.empty((n, k), dtype=np.int32)), (weights, np.empty((n, k), dtype=np.float32)))

        g, outs = self._cached(kv.graphs, (i, kv.n_kv, n), build)
        g.compute()
        for t, array in outs:
            g.read(t, array)
        if n > 1:
            g.close()
        if outs:
            block.moe.run(acts, outs[0][1], outs[1][1])

    def close(self) -> None:
        if self.token_graphs:
            self.token_graphs.close()
        for g, _ in self._graphs.values():
            g.close()
        self._graphs.clear()
        self.decode_acts.close()
