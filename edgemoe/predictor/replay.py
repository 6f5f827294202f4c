"""Replay a routing trace as the prefetcher would see it: one `Query` per step and MoE layer,
and the experts each (query, ahead) pair should have predicted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgemoe.predictor.base import Query, RoutingState
from edgemoe.trace import Trace


@dataclass(frozen=True)
class Point:
    step: int
    index: int     # MoE layer number among the trace's MoE layers
    ids: list[list[int]]
    query: Query


def queries(trace: Trace) -> Iterator[Point]:
    """Every prefetch point of the trace, in engine order (step by step, layer by layer)."""
    state = RoutingState(len(trace.moe_layers))
    for s, step in enumerate(trace.steps):
        logits = trace.router_logits[s] if trace.router_logits is not None else None
        for index, layer in enumerate(trace.moe_layers):
            if layer not in step:
                continue
            rows = np.asarray(logits[layer], np.float32) if logits is not None and layer in logits else None
            yield Point(s, index, step[layer], state.update(index, step[layer], rows))


def target(trace: Trace, step: int, index: int, ahead: int) -> tuple[int, int] | None:
    """(step, MoE layer number) that `ahead` layers after (step, index) lands on, or None when it
    falls outside the trace or into another prompt's prefill (the prefetcher cannot see that)."""
    p = index + ahead
    n = len(trace.moe_layers)
    if p < n:
        return step, p
    nxt = step + p // n
    if p >= 2 * n or nxt >= len(trace.steps) or len(next(iter(trace.steps[nxt].values()))) != 1:
        return None
    return nxt, p - n


def experts_at(trace: Trace, step: int, index: int) -> set[int]:
    """The experts a step demanded at MoE layer number `index` (its last token's for a prefill:
    predictions are about the newest token)."""
    ids = trace.steps[step][trace.moe_layers[index]]
    return set(ids[-1]) if len(ids) > 1 else set(ids[0])
