"""`edgemoe inspect`: what a GGUF file holds and whether stock llama.cpp can run it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    # per layer: expert type -> number of experts of that type (gate's type names an expert), expert bytes
    layer_types: tuple[dict[str, int], ...] = ()
    layer_expert_bytes: tuple[int, ...] = ()
    layout: str = "stock"  # "stock" or "extended v<N>"
    original_experts: int = 0  # {arch}.expert_count: experts per layer before pruning
    # per layer: the ranks of its low-rank expert matrices (empty: all full), in stored order
    layer_ranks: tuple[tuple[int, ...], ...] = ()


def summarize(model: GGUFFile) -> ModelSummary:
    from edgemoe.expert_store import find_experts
    from edgemoe.layout import KEY_VERSION, is_extended

    n_layers = int(model.arch_field("block_count", 0))
    per_layer, layer_bytes = [0] * n_layers, [0] * n_layers
    layer_types: list[Counter] = [Counter() for _ in range(n_layers)]
    layer_ranks: list[list[int]] = [[] for _ in range(n_layers)]
    for (layer, _), spec in find_experts(model).items():
        if layer < n_layers:
            per_layer[layer] += 1
            layer_bytes[layer] += spec.nbytes
            layer_types[layer][spec.parts[0].qtype.name.lower()] += 1
            layer_ranks[layer] += [p.rows for p in spec.parts if p.role.endswith("_a")]
    expert = sum(t.nbytes for t in model.tensors.values() if t.is_expert)
    dense = sum(t.nbytes for t in model.tensors.values()) - expert
    ours = [k for k in model.keys() if k.startswith(EDGEMOE_KEY_PREFIX)]
    extended = is_extended(model)
    layout = f"extended v{int(model.field(KEY_VERSION))}" if extended else "stock"
    if extended:
        reason = (f"edgemoe extended layout v{int(model.field(KEY_VERSION))}: one tensor set per expert with its own "
                  "type, per-layer expert counts and low-rank experts, which stock llama.cpp cannot load; run it "
                  "with --backend edgemoe")
    elif ours:  # metadata only (an embedded predictor): llama.cpp ignores keys it does not know
        reason = "stock llama.cpp layout, plus " + ", ".join(ours[:3]) + " (ignored by llama.cpp)"
    else:
        reason = "stock llama.cpp layout"
    return ModelSummary(
        path=str(model.path), arch=model.arch, name=str(model.field("general.name", "")),
        n_layers=n_layers, experts_per_layer=tuple(per_layer),
        experts_used=int(model.arch_field("expert_used_count", 0)),
        type_counts=dict(Counter(t.qtype.name for t in model.tensors.values())),
        expert_bytes=expert, dense_bytes=dense, stock_loadable=not extended, stock_reason=reason,
        layer_types=tuple(dict(c) for c in layer_types), layer_expert_bytes=tuple(layer_bytes), layout=layout,
        original_experts=int(model.arch_field("expert_count", 0)), layer_ranks=tuple(map(tuple, layer_ranks)))
