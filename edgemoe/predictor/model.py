"""The learned routing predictor: a small MLP from query features to, for each of the next
`horizon` MoE layers, the probability that each expert is chosen."""
from __future__ import annotations

import torch
from torch import nn


class RoutingMLP(nn.Module):
    def __init__(self, n_features: int, n_experts: int, horizon: int, hidden: int = 128):
        super().__init__()
        self.horizon, self.n_experts = horizon, n_experts
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, horizon * n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, F] -> logits [N, H, E]
        return self.net(x).view(-1, self.horizon, self.n_experts)


class Probabilities(nn.Module):
    """What is exported: sigmoid probabilities [N, H, E]."""

    def __init__(self, mlp: RoutingMLP):
        super().__init__()
        self.mlp = mlp

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(features))
