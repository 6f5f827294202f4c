"""Replay a routing trace through every policy and budget, with no I/O: hit rates and bytes
read per token, next to Belady's optimum and random eviction."""
from __future__ import annotations

from dataclasses import dataclass

from edgemoe.policies import POLICIES, make_policy
from edgemoe.residency import Residency
from edgemoe.trace import Trace


@dataclass(frozen=True)
class SimResult:
    policy: str
    budget_bytes: int
    hits: int
    misses: int
    bytes_read: int
    tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / max(self.tokens, 1)


def simulate(trace: Trace, budget_bytes: int, policy: str, seed: int = 0, decode_only: bool = True) -> SimResult:
    """decode_only: prompt prefills (multi-token steps) are replayed but not counted."""
    seq = trace.demand_sequence()
    state = Residency(trace.expert_bytes, budget_bytes, make_policy(policy, seq, seed))
    counted_hits = counted_misses = counted_bytes = 0
    for step in trace.steps:
        hits = misses = nbytes = 0
        for layer in sorted(step):
            keys = [(layer, e) for e in sorted({e for tok in step[layer] for e in tok})]
            # as MoEBlock: when a layer's experts fit the budget together they are pinned together
            together = sum(state.sizes[k] for k in keys) <= budget_bytes
            for key in keys:
                state.touch(key)
                if key in state.resident:
                    hits += 1
                else:
                    misses += 1
                    state.make_room(state.sizes[key])
                    state.begin_load(key)
                    state.finish_load(key, state.sizes[key], prefetched=False)
                    nbytes += state.sizes[key]
                if together:
                    state.pins[key] += 1
            state.pins.clear()
        if not decode_only or len(next(iter(step.values()), [])) == 1:
            counted_hits, counted_misses, counted_bytes = counted_hits + hits, counted_misses + misses, counted_bytes + nbytes
    tokens = sum(n for n in trace.tokens_per_step() if n == 1 or not decode_only)
    return SimResult(policy, budget_bytes, counted_hits, counted_misses, counted_bytes, tokens)


def sweep(trace: Trace, budgets: list[int], policies: tuple[str, ...] = POLICIES) -> list[SimResult]:
    return [simulate(trace, b, p) for b in budgets for p in policies]
