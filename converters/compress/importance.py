"""Expert and layer importance by output reconstruction loss (MoE-I² §3.1).

I(l, j) = sum over calibration batches of ||Y_l - Y_l^{-j}||_F^2, where Y_l^{-j} is layer l's
MoE output with expert j removed (router logit -inf). Layer importance = sum over its experts.
"""
from __future__ import annotations

import torch

from edgemoe.converters.compress.moe_view import MoELayer, moe_output


@torch.no_grad()
def expert_importance(layer: MoELayer, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """[E] reconstruction loss of removing each expert alone."""
    scores = torch.zeros(layer.n_experts, dtype=torch.float64)
    for start in range(0, x.shape[0], batch):
        xb = x[start:start + batch]
        full = moe_output(layer, xb)
        for j in range(layer.n_experts):
            scores[j] += (full - moe_output(layer, xb, (j,))).pow(2).sum().item()
    return scores


def prune_counts(layer_importance: dict[int, float], n_experts: dict[int, int], top_k: dict[int, int],
                 ratio: float) -> dict[int, int]:
    """Split a global pruning ratio across layers, fewer for more important layers (weights
    ∝ 1/importance), never leaving fewer than top_k experts. Largest-remainder rounding."""
    total = round(ratio * sum(n_experts.values()))
    cap = {l: n_experts[l] - top_k[l] for l in n_experts}
    if total > sum(cap.values()):
        raise ValueError(f"pruning {ratio:.0%} of experts would leave fewer than top_k experts in some layer; "
                         f"the most that can be pruned is {sum(cap.values()) / sum(n_experts.values()):.0%}")
    inv = {l: 1.0 / max(layer_importance[l], 1e-12) for l in n_experts}
    counts = {l: 0 for l in n_experts}
    remaining = total
    while remaining > 0:  # water-filling: share what is left among layers below their cap
        open_layers = [l for l in n_experts if counts[l] < cap[l]]
        norm = sum(inv[l] for l in open_layers)
        share = {l: remaining * inv[l] / norm for l in open_layers}
        floors = {l: min(int(share[l]), cap[l] - counts[l]) for l in open_layers}
        if sum(floors.values()) == 0:  # hand out single experts by largest remainder
            for l in sorted(open_layers, key=lambda l: share[l] - int(share[l]), reverse=True)[:remaining]:
                counts[l] += 1
            break
        for l, f in floors.items():
            counts[l] += f
        remaining = total - sum(counts.values())
    return counts


def uniform_counts(n_experts: dict[int, int], top_k: dict[int, int], ratio: float) -> dict[int, int]:
    """The same share in every layer (the uniform baselines), total matching prune_counts."""
    total = round(ratio * sum(n_experts.values()))
    layers = sorted(n_experts)
    counts = {l: min(total // len(layers), n_experts[l] - top_k[l]) for l in layers}
    for l in layers[: total - sum(counts.values())]:
        counts[l] = min(counts[l] + 1, n_experts[l] - top_k[l])
    return counts
