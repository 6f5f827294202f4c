"""End to end: generation with each prefetch predictor at one budget, tokens/s and cache counters,
checking that every predictor produces the same tokens (prefetching never changes the math).

Runs are interleaved (off, router, prior, learned, off, router, ...) so that load from other work
on a shared machine spreads over all predictors; the table reports each one's median.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from edgemoe.engine import Engine, EngineConfig


COUNTERS = ("hits", "misses", "prefetch_issued", "prefetch_hits", "prefetch_wasted", "bytes_read", "stall_s")


@dataclass(frozen=True)
class Contender:
    label: str            # row name
    predictor: str        # "off" (prefetch disabled), none, router, prior, learned
    path: str | None = None


@dataclass
class PredictorRun:
    label: str
    decode_tps: list[float] = field(default_factory=list)   # one per repeat
    decode_tokens: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    tokens_identical: bool = True
    warnings: list[str] = field(default_factory=list)

    @property
    def median_tps(self) -> float:
        return statistics.median(self.decode_tps) if self.decode_tps else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


def run_once(path: Path, prompts: list[str], n_tokens: int, config: EngineConfig, run: PredictorRun) -> list[int]:
    """Generate from every prompt with one engine; add decode counters to `run`; the tokens."""
    engine = Engine(path, config)
    run.warnings = list(engine.warnings)
    tokens, decode_s, decode_n = [], 0.0, 0
    try:
        for prompt in prompts:
            events = list(engine.stream_generate(prompt, n_tokens, stop_at_eos=False))
            tokens += [e.token for e in events]
            decode_s += events[-1].elapsed_s - events[0].elapsed_s
            decode_n += len(events) - 1
            for e in events[1:]:  # event 0 carries the prefill
                for name in COUNTERS:
                    setattr(run, name, getattr(run, name) + getattr(e.cache, name))
    finally:
        engine.close()
    run.decode_tokens += decode_n
    run.decode_tps.append(decode_n / decode_s if decode_s > 0 else 0.0)
    return tokens


def bench_predictors(path: Path, prompts: list[str], n_tokens: int, budget_bytes: int, contenders: list[Contender],
                     policy: str = "lru", n_threads: int | None = None, repeats: int = 3,
                     on_run=None) -> list[PredictorRun]:
    runs = {c.label: PredictorRun(c.label) for c in contenders}
    reference: list[int] | None = None
    for _ in range(repeats):
        for c in contenders:
            config = EngineConfig(budget_bytes=budget_bytes, policy=policy, prefetch=c.predictor != "off",
                                  predictor=c.predictor if c.predictor != "off" else "router", predictor_path=c.path,
                                  n_threads=n_threads, n_ctx=512)
            tokens = run_once(path, prompts, n_tokens, config, runs[c.label])
            reference = tokens if reference is None else reference
            runs[c.label].tokens_identical &= tokens == reference
            on_run and on_run(runs[c.label])
    return list(runs.values())
