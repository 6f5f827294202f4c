"""Stage 1 of MoE-I², end to end, plus the baselines it is measured against.

methods:
  moei2      importance-driven non-uniform counts + layer-wise genetic search + KT field
  uniform    the same search with the same count in every layer
  naee       uniform counts, exhaustive per-layer search (NAEE-style; small E only)
  frequency  uniform counts, drop the least-routed experts
  random     uniform counts, random experts
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from edgemoe.converters.compress.genetic import GAConfig, LayerFitness, exhaustive_search, genetic_search
from edgemoe.converters.compress.importance import expert_importance, prune_counts, uniform_counts
from edgemoe.converters.compress.kt_field import kt_select
from edgemoe.converters.compress.moe_view import MoELayer

METHODS = ("moei2", "uniform", "naee", "frequency", "random")


@dataclass
class PrunePlan:
    method: str
    ratio: float
    drops: dict[int, tuple[int, ...]]
    counts: dict[int, int]
    importance: dict[int, list[float]] = field(default_factory=dict)
    candidates: dict[int, list[tuple[list[int], float]]] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "counts": self.counts,
                "dropped": {l: list(d) for l, d in self.drops.items()}, "expert_importance": self.importance,
                "candidates": self.candidates, "blocks": self.blocks}


def plan_pruning(method: str, model, layers: list[MoELayer], inputs: dict[int, torch.Tensor],
                 windows: torch.Tensor, ratio: float, ga: GAConfig = GAConfig(), block: int = 3,
                 on_step=None) -> PrunePlan:
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    n_exp = {l.index: l.n_experts for l in layers}
    top_k = {l.index: l.top_k for l in layers}
    if method == "moei2":
        imp = {l.index: expert_importance(l, inputs[l.index]) for l in layers}
        counts = prune_counts({i: float(v.sum()) for i, v in imp.items()}, n_exp, top_k, ratio)
    else:
        imp = {}
        counts = uniform_counts(n_exp, top_k, ratio)
    plan = PrunePlan(method, ratio, {}, counts, {i: v.tolist() for i, v in imp.items()})
    if method == "random":
        rng = random.Random(ga.seed)
        plan.drops = {l.index: tuple(sorted(rng.sample(range(l.n_experts), counts[l.index]))) for l in layers}
    elif method == "frequency":
        for l in layers:
            ids = torch.topk(inputs[l.index] @ l.router.weight.T, l.top_k, dim=-1).indices
            freq = Counter(ids.flatten().tolist())
            plan.drops[l.index] = tuple(sorted(sorted(range(l.n_experts), key=lambda e: freq[e])[:counts[l.index]]))
    elif method == "naee":
        plan.drops = {l.index: exhaustive_search(LayerFitness(l, inputs[l.index]), counts[l.index]) for l in layers}
    else:  # moei2 / uniform: genetic search per layer, then the KT-reception field
        cands = {}
        for l in layers:
            ranked = genetic_search(LayerFitness(l, inputs[l.index]), counts[l.index], ga)
            cands[l.index] = [d for d, _ in ranked]
            plan.candidates[l.index] = [(list(d), err) for d, err in ranked]
        plan.drops, plan.blocks = kt_select(model, layers, windows, cands, block, on_step)
    return plan
