"""A decode step as one ggml graph when every expert is resident: llama.cpp's shape (one graph
per token) for a budget that holds every expert.

Layer by layer (edgemoe/forward.py) each layer's routing is read back so the cache can make the
chosen experts resident before the layer's second graph runs: two computes per layer, with the
Python and the thread pool's wake-ups between them, 0.7 ms per layer per token on the 2-core
machine (docs/BENCHMARKS.md), more than the whole attention of a Qwen3-shaped layer. When every
expert is resident (`ExpertCache.hold_all`: the budget holds them all, and the engine loaded
them at open) there is nothing to decide between a layer's router and its experts, so the token
runs as one graph: embedding, every layer (its first graph's ops, `Model.layer_ops`, then its
experts with frames looked up in the graph, frame table[ids] by ggml_get_rows,
`MoEBlock.build_resident`), head, each layer's output chained into the next as a tensor (no
copies through the activation buffers). Every (expert, row) product and every sum is the
layer-by-layer path's, in the same order, so the logits are bit-identical. The
routed ids are outputs, read after the compute and counted as the cache counts a layer's
accesses (`ExpertCache.count_held_step`), so events, traces and the replay see the same steps.

Layer by layer still runs for prefill chunks, under a budget that does not hold every expert,
with dual-precision low copies, when a layer's experts span arenas (mixed precision), and when
an observer needs a layer's input (the prefetcher, traces with router logits).
"""
from __future__ import annotations

import numpy as np

from edgemoe.native import ops
from edgemoe.native.buffers import Buffer
from edgemoe.native.graph import Graph

_TENSORS_PER_LAYER = 384  # a layer graph's cap (edgemoe/native/graph.py default), embedding and head one each


class TokenGraphs:
    def __init__(self, runner):
        self.runner = runner
        self.blocks = runner.model.moe_blocks
        self.cache = self.blocks[0].cache if self.blocks else None
        self._version = -1          # residency version the layout and the frame tables are of
        self._layout: tuple | None = None  # per MoE layer: the arena holding its experts (None: not one arena)
        n_experts = runner.model.args.n_experts
        self.tables = Buffer(runner.backend, {str(b.layer): (ops.I32, (1, n_experts)) for b in self.blocks}) \
            if self.blocks else None

    def forward(self, ids: np.ndarray, kv, start: int) -> np.ndarray | None:
        """Logits [1, V] of one token at `start`, or None (nothing run) where the layer-by-layer
        path must run it."""
        cache = self.cache
        if cache is None or any(b.observers for b in self.blocks) or not cache.hold_all():
            return None
        try:
            layout = self._refresh()
            if layout is None:
                return None
            kv.set_step(start, 1)
            g, (token, logits, routed) = self._graph(kv, layout)
            g.feed(token, ids)
            g.compute()
            out = g.read(logits, np.empty((1, logits.ne[0]), dtype=np.float32))
            chosen = [g.read(t, array).reshape(1, -1) for t, array in routed]
        finally:
            cache.release_all()
        steps = []
        for block, layer_ids in zip(self.blocks, chosen):
            block._ids = layer_ids.astype(np.int64)
            for record in block.recorders:
                record(block.layer, block.last_ids)
            keys = [(block.layer, int(e)) for e in sorted(set(layer_ids[0].tolist()))]
            steps.append((keys, [1] * len(keys)))
        cache.count_held_step(steps)
        return out

    def _refresh(self) -> tuple | None:
        """The arena of each MoE layer's experts, and their frames written to the tables, when
        residency changed since the last call (held: nothing changes while this runs)."""
        version = self.cache.state.version
        if version == self._version:
            return self._layout
        experts, layout = self.cache.experts, []
        lib = ops.lib()
        for block in self.blocks:
            held = [e for key, e in experts.items() if key[0] == block.layer]
            arenas = {e.arena.index for e in held}
            if len(arenas) != 1:
                layout = None
                break
            layout.append(held[0].arena.index)
            table = self.tables[str(block.layer)]
            frames = np.zeros(table.ne[1], dtype=np.int32)  # expert id -> its frame
            for e in held:
                frames[e.spec.expert] = e.index
            lib.ggml_backend_tensor_set(table.ptr, frames.ctypes.data, 0, frames.nbytes)
        self._version, self._layout = version, tuple(layout) if layout is not None else None
        return self._layout

    def _graph(self, kv, layout: tuple):
        key = ("token", kv.n_kv, layout)  # KVCache.set_step drops graphs of other KV buckets (key[1])
        entry = kv.graphs.get(key)
        if entry is None:
            entry = kv.graphs[key] = self._build(kv, layout)
        return entry

    def _build(self, kv, layout: tuple):
        """The token's graph on tensors, not the activation buffers layer by layer goes through
        (no copies of x, h and xn between the parts: 5 fewer nodes per layer)."""
        runner, model = self.runner, self.runner.model
        g = Graph(runner.backend, label="token", reuse=True,
                  max_tensors=_TENSORS_PER_LAYER * (len(model.blocks) + 2))
        token = g.input(ops.I32, (1,))
        x = model.embed.build(g, token)                                    # [D, 1]
        arenas = dict(zip((b.layer for b in self.blocks), layout))
        routed = []
        for i, block in enumerate(model.blocks):
            out, h, xn, chosen = model.layer_ops(g, i, kv, x)
            if chosen is None:
                x = out
                continue
            ids, weights = chosen
            moe = block.moe
            arena = self.cache.arenas.by_index[arenas[moe.layer]]
            x = moe.build_resident(g, xn, h, ids, weights, arena, self.tables[str(moe.layer)])
            routed.append((g.output(ids), np.empty((1, ids.ne[0]), dtype=np.int32)))
        logits = runner.head_of(g, x)
        return g, (token, logits, routed)

    def close(self) -> None:
        if self.tables is not None:
            self.tables.close()
            self.tables = None
        # the runner holds this object: no cycle may keep the model (and its file's mapping) alive
        self.runner = self.cache = None
        self.blocks = []
