"""Compare prefetch predictors on a recorded trace, without running the model: prediction
precision/recall, then a cache replay with the predictions as prefetches (hit rate, bytes read,
wasted prefetch bytes) next to Belady's demand-only optimum.

`compare_predictors(trace, budget_bytes)` is the entry point `edgemoe simulate
--compare-predictors` and `edgemoe tune` use.

Timing model: a prediction made when layer l has routed is loaded while l's experts compute,
so in the replay its loads land before layer l+1's demand (before the next token's first layer
after the last). Prefetches are admitted as `ExpertCache.prefetch` admits them
(`Residency.room_for_prefetch`). Precision and recall are over what the predictor offered the
cache (for `cooccur`: its top-k and the likelier experts beyond).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from edgemoe.policies import DEFAULT_POLICY, Key
from edgemoe.predictor.base import Predictor, PredictorError, RoutingShape, make_predictor
from edgemoe.predictor.replay import experts_at, queries, target
from edgemoe.simulate import simulate
from edgemoe.trace import Trace


@dataclass(frozen=True)
class PredictorResult:
    predictor: str
    policy: str
    budget_bytes: int
    precision: float | None        # prefetched experts that the target layer then chose
    recall: float | None           # chosen experts that had been prefetched for it
    hit_rate: float | None
    belady_hit_rate: float         # demand-only Belady at the same budget
    bytes_per_token: float | None  # demand misses + prefetches
    prefetch_bytes_per_token: float | None
    wasted_bytes_per_token: float | None  # prefetched, never used
    tokens: int
    note: str = ""                 # why a predictor could not be evaluated
    # the counts behind the rates (for summing traces: `combine`)
    correct: int = 0
    predicted: int = 0
    actual: int = 0
    hits: int = 0
    misses: int = 0                # demand misses: accesses that had to wait
    belady_misses: int = 0
    bytes_read: int = 0
    prefetch_bytes: int = 0
    wasted_bytes: int = 0


@dataclass
class Schedule:
    loads: list[dict[int, list[Key]]]  # per step, per layer: keys offered before that layer's demand
    predicted: int = 0   # distinct (target, expert) predictions on counted (decode) targets
    correct: int = 0
    actual: int = 0      # distinct (target, expert) demands on counted targets


def schedule(trace: Trace, predictor: Predictor, score_from: int = 0) -> Schedule:
    """Run `predictor` over the trace as the prefetcher would and score its predictions (on the
    decode steps from `score_from` on)."""
    L = len(trace.moe_layers)
    sched = Schedule([{} for _ in trace.steps])
    predicted: dict[tuple[int, int], set[int]] = {}
    for pt in queries(trace):
        predictor.observe(pt.index, pt.ids)
        nxt = target(trace, pt.step, pt.index, 1)
        if nxt is None:
            continue
        loads = sched.loads[nxt[0]].setdefault(trace.moe_layers[nxt[1]], [])
        for ahead, e, _ in predictor.candidates(pt.query):
            t = target(trace, pt.step, pt.index, ahead)
            if t is None:
                continue
            loads.append((trace.moe_layers[t[1]], e))
            predicted.setdefault(t, set()).add(e)
    decode = [s for s, n in enumerate(trace.tokens_per_step()) if n == 1 and s >= score_from]
    for s in decode:
        for i in range(L):
            want, got = experts_at(trace, s, i), predicted.get((s, i), set())
            sched.actual += len(want)
            sched.predicted += len(got)
            sched.correct += len(want & got)
    return sched


COMPARED = ("none", "router", "prior", "cooccur", "learned@1", "learned")  # learned@1: as many predictions as router


def compare_predictors(trace: Trace, budget_bytes: int, predictors: tuple[str, ...] = COMPARED,
                       predictor_file: str | os.PathLike | bytes | None = None,
                       policy: str = DEFAULT_POLICY, score_from: int = 0) -> list[PredictorResult]:
    """One row per predictor (none, router, prior, learned@1, learned); the learned ones need
    `predictor_file`. A predictor the trace cannot evaluate (router speculation on a trace
    without router_logits) or a file that does not fit gets a row with `note` and no numbers."""
    shape = RoutingShape.of_trace(trace)
    best = simulate(trace, budget_bytes, "belady", score_from=score_from)
    belady = best.hit_rate
    rows = []
    for name in predictors:
        try:
            if name.startswith("learned") and predictor_file is None:
                raise PredictorError("no predictor file given (--predictor FILE.onnx)")
            predictor = make_predictor(name, shape, predictor_file)
            if predictor.needs_logits and trace.router_logits is None:
                raise PredictorError("the trace has no router_logits; record it with the edgemoe backend")
        except PredictorError as exc:
            rows.append(PredictorResult(name, policy, budget_bytes, None, None, None, belady, None, None, None, 0,
                                        str(exc)))
            continue
        sched = schedule(trace, predictor, score_from)
        sim = simulate(trace, budget_bytes, policy, prefetch=sched.loads if name != "none" else None,
                       score_from=score_from)
        n = max(sim.tokens, 1)
        wasted = max(sim.prefetch_bytes - sim.prefetch_used_bytes, 0)
        rows.append(PredictorResult(
            name, policy, budget_bytes,
            sched.correct / sched.predicted if sched.predicted else None,
            sched.correct / sched.actual if sched.actual else None,
            sim.hit_rate, belady, sim.bytes_read / n, sim.prefetch_bytes / n, wasted / n, sim.tokens, "",
            sched.correct, sched.predicted, sched.actual, sim.hits, sim.misses, best.misses, sim.bytes_read,
            sim.prefetch_bytes, wasted))
    return rows


def combine(rows: list[PredictorResult]) -> PredictorResult:
    """One predictor's rows over several traces (same budget share) as one: rates from summed
    counts. A row with a note (not evaluated) makes the result not evaluated."""
    r0 = rows[0]
    noted = [r.note for r in rows if r.note]
    if noted:
        return PredictorResult(r0.predictor, r0.policy, 0, None, None, None, 0.0, None, None, None, 0, noted[0])
    c = {f: sum(getattr(r, f) for r in rows) for f in ("correct", "predicted", "actual", "hits", "misses",
                                                      "belady_misses", "bytes_read", "prefetch_bytes",
                                                      "wasted_bytes", "tokens")}
    n, accesses = max(c["tokens"], 1), max(c["hits"] + c["misses"], 1)
    return PredictorResult(r0.predictor, r0.policy, 0, c["correct"] / c["predicted"] if c["predicted"] else None,
                           c["correct"] / c["actual"] if c["actual"] else None, c["hits"] / accesses,
                           1 - c["belady_misses"] / accesses, c["bytes_read"] / n, c["prefetch_bytes"] / n,
                           c["wasted_bytes"] / n, c["tokens"], "", **{f: c[f] for f in c if f != "tokens"})
