"""Stage 2 of MoE-I²: intra-expert low-rank decomposition with per-expert ranks.

Ranks follow the paper's rule, r(l,j) = floor((I+eps)^a / sum_j (I+eps)^a * R_avg * M_l): more
important experts keep more rank. `rank_ratio` sets R_avg as the share of a matrix's parameters
kept on average: R_avg = rank_ratio * m*n / (m+n) for an [m, n] matrix, so 0.7 stores ~70% of
the expert bytes as two factors A [m, r] and B [r, n].

Two decompositions: plain SVD of W, and activation-aware (whitened) SVD, which truncates W S
where S S^T is the Cholesky factorisation of the calibration inputs' second moment X^T X, so the
truncation minimises the output error ||W X - W' X|| rather than ||W - W'||.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgemoe.converters.compress.moe_view import MoELayer

EPS = 1e-6


@dataclass(frozen=True)
class Factors:
    a: torch.Tensor  # [m, r]
    b: torch.Tensor  # [r, n]

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def weight(self) -> torch.Tensor:
        return self.a @ self.b


def ranks_from_importance(importance: torch.Tensor, m: int, n: int, rank_ratio: float, alpha: float = 0.15,
                          multiple: int = 1) -> list[int]:
    """Per-expert ranks of one layer (the paper's formula); each at least 1, at most min(m, n).
    multiple > 1 rounds each rank to a multiple of it (at least one multiple): a factor [out, r]
    whose rows hold a whole number of quant blocks (32) can be quantized like its expert."""
    if not 0 < rank_ratio <= 1:
        raise ValueError(f"rank ratio must be in (0, 1], got {rank_ratio}")
    r_avg = rank_ratio * m * n / (m + n)
    w = (importance.double() + EPS) ** alpha
    ranks = torch.floor(w / w.sum() * r_avg * len(importance)).long()
    if multiple > 1:
        ranks = (torch.round(ranks.double() / multiple).long() * multiple).clamp(min=multiple)
    return ranks.clamp(1, min(m, n)).tolist()


def svd_factors(w: torch.Tensor, rank: int, x: torch.Tensor | None = None) -> Factors:
    """Rank-`rank` factors of w [m, n]; with inputs x [N, n], whitened (activation-aware)."""
    w = w.double()
    if x is None or x.shape[0] < 2:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return Factors((u[:, :rank] * s[:rank]).float(), vh[:rank].float())
    cov = x.double().T @ x.double()
    cov += torch.eye(cov.shape[0], dtype=cov.dtype) * (1e-5 * cov.diagonal().mean() + 1e-8)  # keep it PD
    s_chol = torch.linalg.cholesky(cov)  # cov = S S^T
    u, s, vh = torch.linalg.svd(w @ s_chol, full_matrices=False)
    b = torch.linalg.solve_triangular(s_chol.T, vh[:rank].T, upper=True).T  # vh_r S^{-1}
    return Factors((u[:, :rank] * s[:rank]).float(), b.float())


@torch.no_grad()
def decompose_layer(layer: MoELayer, x: torch.Tensor, importance: torch.Tensor, rank_ratio: float,
                    whitened: bool, keep: list[int] | None = None, rank_multiple: int = 1) -> dict[int, dict[str, Factors]]:
    """Factors for gate, up and down of each kept expert of `layer`. x: the layer's MoE inputs."""
    keep = keep if keep is not None else list(range(layer.n_experts))
    f_dim = layer.down.shape[2]
    d_dim = layer.down.shape[1]
    r_in = ranks_from_importance(importance[keep], f_dim, d_dim, rank_ratio, multiple=rank_multiple)  # gate/up: [F, D]
    routed = torch.topk(x @ layer.router.weight.T, layer.top_k, dim=-1).indices
    out = {}
    for e, r in zip(keep, r_in):
        xe = x[(routed == e).any(-1)] if whitened else None
        gate, up = layer.gate_up[e].chunk(2, dim=0)
        h = F.silu(xe @ gate.T) * (xe @ up.T) if xe is not None and len(xe) else None
        out[e] = {"gate": svd_factors(gate, r, xe), "up": svd_factors(up, r, xe),
                  "down": svd_factors(layer.down[e], r, h)}
    return out


def factor_bytes(factors: dict[int, dict[str, Factors]], bytes_per_value: float = 2.0) -> int:
    return int(sum(f.a.numel() + f.b.numel() for ex in factors.values() for f in ex.values()) * bytes_per_value)


def factors_by_layer(low_rank: dict[tuple[int, int, str], Factors]) -> dict[int, dict[int, dict[str, Factors]]]:
    """(layer, expert, role) -> Factors regrouped as layer -> expert -> role, what apply_factors takes per layer."""
    out: dict[int, dict[int, dict[str, Factors]]] = {}
    for (layer, e, role), f in low_rank.items():
        out.setdefault(layer, {}).setdefault(e, {})[role] = f
    return out


@torch.no_grad()
def apply_factors(layer: MoELayer, factors: dict[int, dict[str, Factors]]) -> dict[int, tuple]:
    """Write the low-rank reconstructions into the model in place; returns the originals."""
    saved = {}
    for e, fs in factors.items():
        saved[e] = (layer.gate_up[e].clone(), layer.down[e].clone())
        layer.gate_up[e].copy_(torch.cat([fs["gate"].weight(), fs["up"].weight()], dim=0))
        layer.down[e].copy_(fs["down"].weight())
    return saved


@torch.no_grad()
def restore(layer: MoELayer, saved: dict[int, tuple]) -> None:
    for e, (gu, dn) in saved.items():
        layer.gate_up[e].copy_(gu)
        layer.down[e].copy_(dn)


def dense_expert_bytes(layer: MoELayer, n: int, bytes_per_value: float = 2.0) -> int:
    return int(n * (layer.gate_up[0].numel() + layer.down[0].numel()) * bytes_per_value)


