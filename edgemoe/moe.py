"""The MoE block, once for all architectures: route, then run each chosen expert through ggml
on its cached quantized bytes and sum the weighted outputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgemoe.expert_cache import ExpertCache
from edgemoe.expert_store import LowRank, ResidentExpert
from edgemoe.native.backend import CpuBackend
from edgemoe.native.tensors import Graph, Weight


@dataclass(frozen=True)
class RouterConfig:
    top_k: int
    gating: str = "softmax"   # softmax | sigmoid
    normalize: bool = True    # renormalise the top-k weights to sum to 1
    scale: float = 1.0        # DeepSeek's routed_scaling_factor


def route(logits: torch.Tensor, cfg: RouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [T, E] -> weights [T, k], expert ids [T, k] (llama.cpp's build_moe_ffn order)."""
    probs = torch.softmax(logits, dim=-1) if cfg.gating == "softmax" else torch.sigmoid(logits)
    weights, ids = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.normalize:
        # llama.cpp clamps the sum at f16's smallest normal (matters only for sigmoid gating)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
    return weights * cfg.scale, ids


# experts per ggml graph: a low-rank expert is up to 8 tensors / 7 nodes (Graph's limits: 512 / 256)
_EXPERTS_PER_GRAPH = 32


def expert_ffns(backend: CpuBackend, work: list[tuple[ResidentExpert, torch.Tensor]]) -> list[torch.Tensor]:
    """SwiGLU FFNs of several experts on their own tokens, one ggml graph per 32 experts: a decode
    step's layer (top-k experts) is one graph compute, not one per expert. A full matrix is one
    matmul on its bytes; a low-rank one two (x -> A -> B), as llama.cpp's build_moe_ffn otherwise.
    work: (expert, x [n, D]) -> [[n, D]]."""
    ys: list[torch.Tensor] = []
    for start in range(0, len(work), _EXPERTS_PER_GRAPH):
        with Graph(backend, label="experts") as g:
            outs = []
            for expert, x in work[start:start + _EXPERTS_PER_GRAPH]:
                m = expert.matrices
                xin = g.input(x.numpy())
                h = g.swiglu(_apply(g, m["gate"], xin), _apply(g, m["up"], xin))   # [n, F]
                outs.append((_apply(g, m["down"], h), (x.shape[0], m["down"].rows)))
            ys.extend(torch.from_numpy(y) for y in g.compute(outs))
    return ys


def _apply(g: Graph, m: Weight | LowRank, x: int) -> int:
    # x: [n, in] -> [n, out]; low rank: [n, in] -> [n, r] -> [n, out]
    return g.matmul(m.b, g.matmul(m.a, x)) if isinstance(m, LowRank) else g.matmul(m, x)


def expert_ffn(backend: CpuBackend, expert: ResidentExpert, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN of one expert. x: [n, D] -> [n, D]."""
    return expert_ffns(backend, [(expert, x)])[0]


class MoEBlock:
    def __init__(self, layer: int, router: torch.Tensor, cfg: RouterConfig, cache: ExpertCache, backend: CpuBackend):
        self.layer, self.router, self.cfg, self.cache, self.backend = layer, router, cfg, cache, backend
        self.last_ids: torch.Tensor | None = None  # [T, k] of the latest call, for traces
        self.observers: list = []  # called as f(layer, x) before experts run (the prefetcher)
        self.recorders: list = []  # called as f(layer, ids [T, k]) after routing (traces)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]  router: [E, D]
        for observe in self.observers:
            observe(self.layer, x)
        weights, ids = route(x @ self.router.T, self.cfg)
        self.last_ids = ids
        for record in self.recorders:
            record(self.layer, ids)
        out = torch.zeros_like(x)
        # ascending id order: the demand sequence then depends on routing only, never on cache
        # state, so a recorded trace replays exactly (and Belady's future is well defined)
        chosen = ids.unique().tolist()
        assign = {e: torch.nonzero(ids == e, as_tuple=True) for e in chosen}  # e -> (tokens, slots)
        keys = [(self.layer, e) for e in chosen]
        # largest gate weight per expert: dual precision loads the full copy of a miss above a threshold
        gates = [float(weights[assign[e]].max()) for e in chosen]
        if sum(self.cache.specs[k].alloc_bytes for k in keys) <= self.cache.budget_bytes:
            # all fit at once: pin them all and run them together (one graph per 32 experts)
            got = []  # (expert, pinned)
            try:
                for k, e, g in zip(keys, chosen, gates):
                    got.append(self.cache.acquire_for(k, g, len(assign[e][0])))
                ys = expert_ffns(self.backend, [(ex, x[assign[e][0]]) for (ex, _), e in zip(got, chosen)])
            finally:
                for k, (_, pinned) in zip(keys, got):
                    if pinned:
                        self.cache.release(k)
        else:  # a budget below the layer's working set: one expert resident at a time
            ys = []
            for k, e, g in zip(keys, chosen, gates):
                expert, pinned = self.cache.acquire_for(k, g, len(assign[e][0]))
                try:
                    ys.append(expert_ffn(self.backend, expert, x[assign[e][0]]))
                finally:
                    if pinned:
                        self.cache.release(k)
        for e, y in zip(chosen, ys):
            tok, slot = assign[e]
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out


class SharedExpertMoE:
    """Routed experts plus an always-on dense FFN (`shared`, [T, D] -> [T, D]).

    DeepSeek adds the shared output as is; Qwen2-MoE scales it per token by sigmoid(x . gate)
    (gate: [1, D], llama.cpp's ffn_gate_inp_shexp)."""

    def __init__(self, moe: MoEBlock, shared, gate: torch.Tensor | None = None):
        self.moe, self.shared, self.gate = moe, shared, gate

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        return self.moe(x) + self.shared_part(x)

    def shared_part(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared(x)
        if self.gate is not None:
            shared = shared * torch.sigmoid(x @ self.gate.T)  # [T, 1]
        return shared
