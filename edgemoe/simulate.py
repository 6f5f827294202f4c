"""Replay a routing trace through every policy and budget, with no I/O: hit rates and bytes
read per token, next to Belady's optimum and random eviction."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from edgemoe.policies import POLICIES, Key, make_policy
from edgemoe.residency import Residency
from edgemoe.trace import Trace


@dataclass(frozen=True)
class SimResult:
    policy: str
    budget_bytes: int
    hits: int
    misses: int
    bytes_read: int                 # demand misses and prefetches
    tokens: int
    prefetch_bytes: int = 0
    prefetch_hits: int = 0
    prefetch_used_bytes: int = 0    # bytes of prefetched experts a demand access then used

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / max(self.tokens, 1)


def simulate(trace: Trace, budget_bytes: int, policy: str, seed: int = 0, decode_only: bool = True,
             prefetch: list[dict[int, list[Key]]] | None = None, score_from: int = 0) -> SimResult:
    """decode_only: prompt prefills (multi-token steps) are replayed but not counted; nor are the
    steps before `score_from` (e.g. those a predictor was trained on).

    prefetch: per step, per layer, keys offered as to `ExpertCache.prefetch` just before that
    layer's demand accesses (aligned with trace.steps; `edgemoe.bench.predictor_compare.schedule` builds
    it). The engine's prefetch thread races its demand path, so with prefetch the replay
    approximates the engine rather than reproducing it."""
    seq = trace.demand_sequence()
    state = Residency(trace.expert_bytes, budget_bytes, make_policy(policy, seq, seed))
    if state.holds_everything():  # the engine loads every expert at open (ExpertCache.preload_all)
        for key in sorted(state.sizes):
            state.preload(key)
    counted = [0, 0, 0, 0, 0, 0]  # hits, misses, bytes read, prefetch bytes, prefetch hits, prefetch used bytes
    for i, step in enumerate(trace.steps):
        hits = misses = nbytes = pf_bytes = pf_used = 0
        pf_hits0 = state.c.prefetch_hits
        for layer in sorted(step):
            for key in prefetch[i].get(layer, ()) if prefetch else ():
                # as ExpertCache.prefetch: skip resident keys, the same admission
                if key in state.resident or not state.room_for_prefetch(key):
                    continue
                state.begin_load(key)
                state.finish_load(key, state.sizes[key], prefetched=True)
                pf_bytes += state.sizes[key]
            h, m, used = layer_step(state, layer, Counter(e for tok in step[layer] for e in tok))
            hits, misses, nbytes, pf_used = hits + h, misses + len(m), nbytes + sum(state.sizes[k] for k in m), pf_used + used
        if i >= score_from and (not decode_only or len(next(iter(step.values()), [])) == 1):
            for j, n in enumerate((hits, misses, nbytes + pf_bytes, pf_bytes, state.c.prefetch_hits - pf_hits0,
                                  pf_used)):
                counted[j] += n
    tokens = sum(n for n in trace.tokens_per_step()[score_from:] if n == 1 or not decode_only)
    return SimResult(policy, budget_bytes, *counted[:3], tokens, *counted[3:])


def layer_step(state: Residency, layer: int, slots: Counter) -> tuple[int, list[Key], int]:
    """One layer's demand accesses, as the engine makes them: (hits, missed keys, bytes of unused
    prefetches that were hit). slots: tokens routed to each expert. When the layer's experts fit
    the budget together, MoEBlock acquires them together (`ExpertCache.acquire_many`: all touched,
    the resident ones pinned as hits, then the misses make room); else one at a time, each
    released before the next."""
    keys = [(layer, e) for e in sorted(slots)]
    together = sum(state.sizes[k] for k in keys) <= state.budget_bytes
    if together:
        state.touch_step(keys, [slots[k[1]] for k in keys])
    hits, missed, used = 0, [], 0
    for key in sorted(keys, key=lambda k: k not in state.resident) if together else keys:
        if not together:
            state.touch(key, slots[key[1]])
        if key in state.resident:
            hits += 1
            used += state.sizes[key] if key in state.unused_prefetch else 0
            state.hit(key)
        else:
            missed.append(key)
            state.make_room(state.sizes[key])
            state.begin_load(key)
            state.finish_load(key, state.sizes[key], prefetched=False)
        if together:
            state.pins[key] += 1
    state.pins.clear()
    return hits, missed, used


def sweep(trace: Trace, budgets: list[int], policies: tuple[str, ...] = POLICIES) -> list[SimResult]:
    return [simulate(trace, b, p) for b in budgets for p in policies]


def total(results: list[SimResult], budget_bytes: int = 0) -> SimResult:
    """Several traces' results for one policy as one: counts and tokens summed (budget_bytes:
    what to report as the budget, e.g. 0 when each trace ran at its own share)."""
    return SimResult(results[0].policy, budget_bytes, *(sum(getattr(r, f) for r in results) for f in
                     ("hits", "misses", "bytes_read", "tokens", "prefetch_bytes", "prefetch_hits",
                      "prefetch_used_bytes")))
