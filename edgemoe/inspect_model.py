"""`edgemoe inspect`: what a GGUF file holds and whether stock llama.cpp can run it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from edgemoe.gguf_file import EDGEMOE_KEY_PREFIX, GGUFFile


@dataclass(frozen=True)
class ModelSummary:
    path: str
    arch: str
    name: str
    n_layers: int
    experts_per_layer: tuple[int, ...]  # 0 for dense layers
    experts_used: int
    type_counts: dict[str, int]
    expert_bytes: int
    dense_bytes: int
    stock_loadable: bool
    stock_reason: str


def summarize(model: GGUFFile) -> ModelSummary:
    n_layers = int(model.arch_field("block_count", 0))
    per_layer = [0] * n_layers
    for t in model.tensors.values():
        if t.is_expert and t.layer is not None and t.layer < n_layers and len(t.shape) == 3:
            per_layer[t.layer] = max(per_layer[t.layer], t.shape[0])
    expert = sum(t.nbytes for t in model.tensors.values() if t.is_expert)
    dense = sum(t.nbytes for t in model.tensors.values()) - expert
    ours = [k for k in model.keys() if k.startswith(EDGEMOE_KEY_PREFIX)]
    reason = ("uses edgemoe's extended layout (" + ", ".join(ours[:3]) + ")") if ours else "stock llama.cpp layout"
    return ModelSummary(
        path=str(model.path), arch=model.arch, name=str(model.field("general.name", "")),
        n_layers=n_layers, experts_per_layer=tuple(per_layer),
        experts_used=int(model.arch_field("expert_used_count", 0)),
        type_counts=dict(Counter(t.qtype.name for t in model.tensors.values())),
        expert_bytes=expert, dense_bytes=dense, stock_loadable=not ours, stock_reason=reason)
