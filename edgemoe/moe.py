"""The MoE block, once for all architectures (llama.cpp's build_moe_ffn).

A layer's first graph ends with the router: logits, softmax or sigmoid, top-k ids and their
(renormalised, scaled) weights, read back here. The cache then makes the chosen experts resident
(ascending ids, so the demand sequence depends on routing only), and the layer's second graph
computes every (token, slot) pair of an arena in one ggml_mul_mat_id per matrix over that
arena's frames (ids: frame indices), gate and up, swiglu, down, times the router weight, into
the pair's row of a [D, k*T] buffer; then sums the k rows of each token in slot order, adds
the shared expert and the residual. Pairs whose experts sit in different arenas (mixed
precision, dual-precision low copies) are one indexed matmul set per arena. When a layer's
experts do not fit the budget together, they run one at a time into the same buffer and the
same sum runs after them, so the result is bit-identical at every budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgemoe.native import ops
from edgemoe.native.graph import Graph
from edgemoe.native.ops import Tensor

# the router weights' sum is clamped at f16's smallest normal before renormalising (llama.cpp)
_MIN_WEIGHT_SUM = 6.103515625e-5
_MAX_DECODE_GRAPHS = 16  # per layer: decode expert graphs kept (one per arena mix seen)


@dataclass(frozen=True)
class RouterConfig:
    top_k: int
    gating: str = "softmax"   # softmax | sigmoid
    normalize: bool = True    # renormalise the top-k weights to sum to 1
    scale: float = 1.0        # DeepSeek's routed_scaling_factor


def route(logits: torch.Tensor, cfg: RouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, k], ids [T, k] in float: the reference the calibration and
    compression tools (torch, float experts) route with; the engine routes in its graph."""
    probs = torch.softmax(logits, dim=-1) if cfg.gating == "softmax" else torch.sigmoid(logits)
    weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=_MIN_WEIGHT_SUM)
    return weights * cfg.scale, ids


def build_router(g, router: Tensor, xn: Tensor, cfg: RouterConfig) -> tuple[Tensor, Tensor]:
    """xn [D, T] -> ids i32 [k, T] (largest first), weights [k, T]."""
    n_expert, n_tokens, k = router.ne[1], xn.ne[1], cfg.top_k
    logits = g.mul_mat(router, xn)                                                 # [E, T]  ffn_moe_logits
    probs = g.soft_max(logits) if cfg.gating == "softmax" else g.sigmoid(logits)   # [E, T]  ffn_moe_probs
    ids = g.top_k(probs, k)                                                        # [k, T]  ffn_moe_topk
    weights = g.reshape(g.get_rows(g.reshape(probs, 1, n_expert, n_tokens), ids), k, n_tokens)  # [k, T]
    if cfg.normalize:
        weights = g.div(weights, g.clamp(g.sum_rows(weights), _MIN_WEIGHT_SUM, float("inf")))
    if cfg.scale != 1.0:
        weights = g.scale(weights, cfg.scale)
    return ids, weights


def expert_ffn(g, arena, x: Tensor, ids: Tensor) -> Tensor:
    """SwiGLU of each pair's expert: x [D, 1, N], ids (frames) i32 [1, N] -> [D, 1, N]. A low-rank
    matrix is two indexed matmuls (x -> A -> B)."""
    t = arena.tensors

    def apply(role: str, inp: Tensor) -> Tensor:
        if role in t:
            return g.mul_mat_id(t[role], inp, ids)
        return g.mul_mat_id(t[role + "_b"], g.mul_mat_id(t[role + "_a"], inp, ids), ids)

    return apply("down", g.swiglu(apply("gate", x), apply("up", x)))     # [F, 1, N] -> [D, 1, N]


def pair_ops(g, arena, xn: Tensor, y: Tensor, tok: Tensor, frames: Tensor, weights: Tensor, rows: Tensor) -> Tensor:
    """One arena's experts for N (token, slot) pairs into their rows of y [D, k*T]: tok i32 [N]
    (each pair's token column of xn [D, T]), frames i32 [1, N] (its expert's frame), weights
    [1, 1, N] (its router weight), rows i64 [N] (its row p = t * k + slot of y)."""
    dim, n = xn.ne[0], rows.ne[0]
    xa = g.reshape(g.get_rows(xn, tok), dim, 1, n)                     # [D, 1, N]
    out = g.mul(expert_ffn(g, arena, xa, frames), weights)             # [D, 1, N]
    return g.expand(g.set_rows(y, g.reshape(out, dim, n), rows))      # pair rows of [D, k*T]


class _Pairs:
    """One arena's (token, slot) pairs in a graph: inputs bound to arrays filled before each compute."""

    def __init__(self, g, n: int):
        self.tok, self.frames = g.input(ops.I32, (n,)), g.input(ops.I32, (1, n))
        self.weights, self.rows = g.input(ops.F32, (1, 1, n)), g.input(ops.I64, (n,))
        self._arrays = [g.bind(t) for t in (self.rows, self.tok, self.frames, self.weights)]
        self._rows: list[int] = []

    def set(self, rows: list[int], k: int, frames: list[int], weights) -> None:
        """rows: the pairs' positions p = t * k + slot (ascending), their experts' frames and weights."""
        r, tok, f, w = self._arrays
        if rows != self._rows:  # a decode step's pairs are the same positions every time
            r[:] = rows
            np.floor_divide(r, k, out=tok, casting="unsafe")
            self._rows = rows
        f[:] = frames
        w[:] = weights


class MoEBlock:
    def __init__(self, layer: int, router_weight: Tensor, router: torch.Tensor, cfg: RouterConfig, cache, backend):
        self.layer, self.router_weight, self.router, self.cfg = layer, router_weight, router, cfg
        self.cache, self.backend = cache, backend
        self.shared = None        # SharedExpertMoE adds its FFN to the combine step
        self._ids: np.ndarray | None = None  # [T, k] of the latest call
        self.observers: list = []  # called as f(layer, x [T, D]) once routed, before experts run (prefetcher)
        self.recorders: list = []  # called as f(layer, ids [T, k]) after routing (traces)
        self._graphs: dict[tuple, tuple] = {}  # decode graphs: (T, combine, arenas) -> (graph, [_Pairs])

    def build_router(self, g, xn: Tensor) -> tuple[Tensor, Tensor]:
        return build_router(g, self.router_weight, xn, self.cfg)

    @property
    def last_ids(self) -> torch.Tensor | None:
        """[T, k] expert ids of the latest call (traces, events)."""
        return None if self._ids is None else torch.from_numpy(self._ids)

    def run(self, acts, ids: np.ndarray, weights: np.ndarray) -> None:
        """Experts for routing ids/weights [T, k]: acts.x := acts.h + MoE(acts.xn) (+ shared)."""
        n_tokens, k = ids.shape
        if self.observers:
            x = torch.from_numpy(acts.read("xn", n_tokens))
            for observe in self.observers:
                observe(self.layer, x)
        self._ids = ids.astype(np.int64)
        if self.recorders:
            for record in self.recorders:
                record(self.layer, self.last_ids)
        flat, w = ids.reshape(-1).tolist(), weights.reshape(-1)
        members: dict[int, list[int]] = {}  # expert -> its pairs p = t * k + slot
        for p, e in enumerate(flat):
            members.setdefault(e, []).append(p)
        # ascending ids: the demand order depends on routing only (traces replay exactly)
        chosen = sorted(members)
        keys = [(self.layer, e) for e in chosen]
        slots = [len(members[e]) for e in chosen]
        cache = self.cache
        if sum(cache.state.sizes[key] for key in keys) > cache.budget_bytes:
            # a budget below the layer's working set: one expert resident at a time, then the sum
            for key, n, e in zip(keys, slots, chosen):
                expert, pinned = cache.acquire_for(key, float(w[members[e]].max()), n)
                try:
                    self._compute(n_tokens, k, w, [(expert, members[e])], False, acts)
                finally:
                    if pinned:
                        cache.release(key)
            self._compute(n_tokens, k, w, [], True, acts)
            return
        # all fit at once: pinned together, one graph (pairs, sum, shared, residual)
        if cache.low is None:  # the misses' reads in flight together
            got, pinned = cache.acquire_many(keys, slots), keys
        else:  # dual precision: a miss loads its full copy if its largest gate weight is above a threshold
            got, pinned = [], []
            try:
                for key, n, e in zip(keys, slots, chosen):
                    expert, pin = cache.acquire_for(key, float(w[members[e]].max()), n)
                    got.append(expert)
                    if pin:
                        pinned.append(key)
            except BaseException:
                cache.release_many(pinned)
                raise
        try:
            self._compute(n_tokens, k, w, [(ex, members[e]) for ex, e in zip(got, chosen)], True, acts)
        finally:
            cache.release_many(pinned)

    def _compute(self, n_tokens: int, k: int, w: np.ndarray, pairs: list, combine: bool, acts) -> None:
        """pairs: (resident expert, its pair positions) into acts.y; with `combine`, then the sum."""
        by_arena: dict[int, tuple] = {}  # arena index -> (arena, [(position, frame)])
        for expert, positions in pairs:
            items = by_arena.setdefault(expert.arena.index, (expert.arena, []))[1]
            items.extend((p, expert.index) for p in positions)
        active = []
        for index in sorted(by_arena):
            arena, items = by_arena[index]
            items.sort()
            active.append((arena, [p for p, _ in items], [f for _, f in items]))
        if n_tokens == 1 and len(active) > 1:
            self._compute_per_arena(k, w, active, combine, acts)
            return
        key = (n_tokens, combine, tuple((a.index, len(p)) for a, p, _ in active))
        graph, inputs = self._graph(acts, key, n_tokens, k, [(a, len(p)) for a, p, _ in active], combine)
        for (_, positions, frames), pair_inputs in zip(active, inputs):
            pair_inputs.set(positions, k, frames, w if len(positions) == len(w) else w[positions])
        graph.compute()
        if n_tokens > 1:
            graph.close()

    def _compute_per_arena(self, k: int, w: np.ndarray, active: list, combine: bool, acts) -> None:
        """A decode step whose pairs span arenas (mixed precision, dual low copies): one compute
        per arena, then the sum. One graph for the whole step would be keyed by how many pairs
        each arena got, ~35 mixes per layer in 120 tokens of the mixed Qwen3 slice, so the kept
        graphs (_MAX_DECODE_GRAPHS) were rebuilt for 6 of 16 layers every token (2.5 ms). A
        per-arena graph depends only on (arena, pairs), and is shared by every layer (arenas
        and the activations are), so there are at most arenas x k of them."""
        for arena, positions, frames in active:
            key = ("pairs", arena.index, len(positions), k)
            entry = acts.graphs.get(key)
            if entry is None:
                g = Graph(self.backend, label="experts", reuse=True, max_tensors=96)
                inputs = _Pairs(g, len(positions))
                pair_ops(g, arena, acts.view(g, "xn", 1), acts.view(g, "y", k), inputs.tok, inputs.frames,
                         inputs.weights, inputs.rows)
                entry = acts.graphs[key] = (g, inputs)
            g, inputs = entry
            inputs.set(positions, k, frames, w[positions])
            g.compute()
        if combine:
            entry = self._graphs.get(("sum", k))
            if entry is None:
                g = Graph(self.backend, label="experts", reuse=True)
                self._combine(g, acts, acts.view(g, "y", k), 1, k)
                entry = self._graphs[("sum", k)] = (g, [])
            entry[0].compute()

    def _graph(self, acts, key, n_tokens: int, k: int, active, combine: bool):
        if key in self._graphs:
            return self._graphs[key]
        reuse = n_tokens == 1  # decode: built once per arena mix; prefill: built per call
        g = Graph(self.backend, label="experts", reuse=reuse)
        xn, y = acts.view(g, "xn", n_tokens), acts.view(g, "y", k * n_tokens)
        pairs = []
        for arena, n in active:
            inputs = _Pairs(g, n)
            y = pair_ops(g, arena, xn, y, inputs.tok, inputs.frames, inputs.weights, inputs.rows)
            pairs.append(inputs)
        if combine:
            self._combine(g, acts, y, n_tokens, k)
        else:
            g.expand(y)
        entry = (g, pairs)
        if reuse:
            if len(self._graphs) >= _MAX_DECODE_GRAPHS:  # many arena mixes (mixed precision, dual): keep the newest
                self._graphs.pop(next(iter(self._graphs)))[0].close()
            self._graphs[key] = entry
        return entry

    def build_resident(self, g, xn: Tensor, h: Tensor, ids: Tensor, weights: Tensor, arena, table: Tensor) -> Tensor:
        """A decode step's experts in a whole-token graph, every expert of the layer resident in
        `arena` (edgemoe/token_graph.py): frames = table[ids] (table i32 [1, E]: each expert's
        frame) looked up in the graph, the token's xn [D, 1] broadcast to its k experts as
        llama.cpp's build_moe_ffn does. Returns the layer's output x [D, 1]. Each (expert, row)
        product is the same kernel on the same bytes as `_compute`'s pairs, summed in the same
        slot order: bit-identical (tests/test_engine_archs.py)."""
        k, dim = ids.ne[0], xn.ne[0]
        frames = g.reshape(g.get_rows(table, ids), k, 1)                  # [k, 1]
        w = g.reshape(weights if weights.contiguous else g.cont(weights), 1, k, 1)
        out = g.mul(expert_ffn(g, arena, g.reshape(xn, dim, 1, 1), frames), w)   # [D, k, 1]
        return self._sum(g, g.reshape(out, dim, k), 1, k, xn, h)

    def _combine(self, g, acts, y: Tensor, n_tokens: int, k: int) -> None:
        """x := the layer's output from the pair rows y and the buffers' xn and h."""
        out = self._sum(g, y, n_tokens, k, acts.view(g, "xn", n_tokens), acts.view(g, "h", n_tokens))
        g.expand(g.cpy(out, acts.view(g, "x", n_tokens)))

    def _sum(self, g, y: Tensor, n_tokens: int, k: int, xn: Tensor, h: Tensor) -> Tensor:
        """h + sum over slots of y [D, k*T] (slot order, as llama.cpp) + shared(xn): [D, T]."""
        dim, row = y.ne[0], 4 * y.ne[0]
        out = g.view_2d(y, dim, n_tokens, k * row, 0)                     # [D, T] slot 0
        for slot in range(1, k):
            out = g.add(out, g.view_2d(y, dim, n_tokens, k * row, slot * row))
        if k == 1:
            out = g.cont(out)
        if self.shared is not None:
            out = g.add(out, self.shared.build(g, xn))
        return g.add(out, h)

    def close(self) -> None:
        for graph, _ in self._graphs.values():
            graph.close()
        self._graphs.clear()


class SharedExpertMoE:
    """Routed experts plus an always-on dense FFN (`shared`: build(g, x [D, T]) -> [D, T]).

    DeepSeek adds the shared output as is; Qwen2-MoE scales it per token by sigmoid(gate . x)
    (gate: llama.cpp's ffn_gate_inp_shexp, ne [D, 1])."""

    def __init__(self, moe: MoEBlock, shared, gate: Tensor | None = None):
        self.moe, self.shared, self.gate = moe, shared, gate
        moe.shared = self

    def build(self, g, x: Tensor) -> Tensor:
        out = self.shared.build(g, x)
        if self.gate is not None:
            out = g.mul(out, g.sigmoid(g.mul_mat(self.gate, x)))  # [D, T] * [1, T]
        return out

    def shared_part(self, x: torch.Tensor) -> torch.Tensor:
        """The shared FFN on torch x [T, D] (calibration and compression tools)."""
        from edgemoe.layers import eager

        return eager(self.moe.backend, self.build, x)
