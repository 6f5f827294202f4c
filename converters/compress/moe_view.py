"""A uniform view of a transformers MoE model's sparse blocks (Mixtral, Qwen2/3-MoE, OLMoE):
the router weight, the fused experts, and a way to drop experts by masking router logits.

Dropping expert j = setting its router logit to -inf (the paper's definition): top-k is then
taken among the kept experts and renormalised exactly as the model's own router does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from edgemoe.converters.errors import ConvertError


@dataclass(frozen=True)
class MoELayer:
    index: int            # decoder layer index
    block: nn.Module      # the sparse MoE block (mlp)
    router: nn.Module     # block.gate: .weight [E, D]
    n_experts: int
    top_k: int
    normalize: bool       # renormalise the top-k weights
    scale: float = 1.0    # DeepSeek's routed_scaling_factor (streamed layers; transformers blocks: 1)
    gating: str = "softmax"  # softmax | sigmoid

    @property
    def gate_up(self) -> torch.Tensor:  # [E, 2F, D]
        return self.block.experts.gate_up_proj

    @property
    def down(self) -> torch.Tensor:  # [E, D, F]
        return self.block.experts.down_proj


def moe_layers(model: nn.Module) -> list[MoELayer]:
    layers = []
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None)
        if gate is None or not hasattr(getattr(mlp, "experts", None), "gate_up_proj"):
            continue  # a dense layer (e.g. DeepSeek's leading ones)
        # DeepSeek's router keeps norm_topk_prob in the config only (Mixtral: always normalised)
        normalize = getattr(gate, "norm_topk_prob", getattr(model.config, "norm_topk_prob", True))
        layers.append(MoELayer(i, mlp, gate, gate.weight.shape[0], int(gate.top_k), bool(normalize),
                               float(getattr(gate, "routed_scaling_factor", 1.0))))
    if not layers:
        raise ConvertError(f"{type(model).__name__} has no sparse MoE blocks edgemoe can compress")
    return layers


class MaskedRouter(nn.Module):
    """The router of `layer` with experts not in `keep` removed (logit -inf)."""

    def __init__(self, layer: MoELayer, keep: torch.Tensor):
        super().__init__()
        self.inner, self.layer = layer.router, layer
        self.register_buffer("mask", torch.where(keep, 0.0, float("-inf")))

    def forward(self, hidden_states):
        h = hidden_states.reshape(-1, self.inner.weight.shape[1])
        logits = F.linear(h, self.inner.weight) + self.mask
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.layer.top_k, dim=-1)
        if self.layer.normalize:
            top = top / top.sum(-1, keepdim=True)
        return logits, (top * self.layer.scale).to(logits.dtype), idx


@contextlib.contextmanager
def dropped(layers: list[MoELayer], drops: dict[int, tuple[int, ...]]):
    """Run the model with experts dropped: drops[layer index] = expert ids to remove."""
    originals = {}
    try:
        for layer in layers:
            if drops.get(layer.index):
                keep = torch.ones(layer.n_experts, dtype=torch.bool)
                keep[list(drops[layer.index])] = False
                originals[layer.index] = layer.block.gate
                layer.block.gate = MaskedRouter(layer, keep)
        yield
    finally:
        for layer in layers:
            if layer.index in originals:
                layer.block.gate = originals[layer.index]


def streamed_layer(index: int, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   top_k: int, normalize: bool, scale: float = 1.0, gating: str = "softmax") -> MoELayer:
    """A MoELayer over plain tensors (no transformers model): router [E, D], gate_up [E, 2F, D]
    (gate rows first), down [E, D, F] — what the layer-by-layer pipeline loads from the checkpoint."""
    experts = SimpleNamespace(gate_up_proj=gate_up, down_proj=down)
    block = SimpleNamespace(gate=SimpleNamespace(weight=router), experts=experts)
    return MoELayer(index, block, block.gate, router.shape[0], top_k, normalize, scale, gating)


def moe_output(layer: MoELayer, x: torch.Tensor, drop: tuple[int, ...] = ()) -> torch.Tensor:
    """The dense reference of the block's routed-expert output with `drop` removed. x: [N, D]."""
    logits = x @ layer.router.weight.T  # [N, E]
    if drop:
        logits[:, list(drop)] = float("-inf")
    probs = torch.softmax(logits.float(), dim=-1) if layer.gating == "softmax" else torch.sigmoid(logits.float())
    top, idx = torch.topk(probs, layer.top_k, dim=-1)
    if layer.normalize:
        top = top / top.sum(-1, keepdim=True)
    top = top * layer.scale
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        gate, up = (x[tok] @ layer.gate_up[e].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ layer.down[e].T
        out.index_add_(0, tok, y * top[tok, slot, None])
    return out
