"""Live statistics folded from the event stream (pure: no Textual, no engine).

`StatsTracker.add` runs in the generation thread once per token; `snapshot()` gives the frozen
view the stats widgets render, a few times a second.

Per-layer hit rate is an estimate from the events alone (CacheStats has no per-layer counters):
a decode step's routing names the experts each MoE layer chose, and an access counts as a hit
when that expert was resident after the previous step. It differs from the engine's own count
where an earlier layer's miss evicted the expert within the step (counted a hit here) and where a
prefetch brought it in during the step (counted a miss here). On the demo, 100 tokens, the sums
over layers were 596 vs the engine's 558 hits of 792 accesses at a 50% budget, 380 vs 349 at 25%,
602 vs 637 at 50% with prefetch. The overall hit rate is the engine's own.
"""
from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

from edgemoe.events import CacheStats, StepEvent

WINDOW_STEPS = 32   # recent rates: long enough to be steady, short enough to show a budget change
HEAT_DECAY = 0.9    # per decode step: a selection fades to ~a third in 10 tokens


@dataclass(frozen=True)
class StatsSnapshot:
    backend: str = "edgemoe"
    has_cache: bool = True
    generating: bool = False
    tokens: int = 0                       # tokens of the current (or last) reply
    session_tokens: int = 0
    tokens_per_s: float = 0.0
    hit_rate: float | None = None         # last WINDOW_STEPS steps, engine counters
    session_hit_rate: float | None = None
    layer_hit_rate: tuple[float | None, ...] = ()   # per MoE layer, last WINDOW_STEPS decode steps
    bytes_per_token: float | None = None  # expert bytes read per decoded token, recent
    stall_s_per_token: float | None = None
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    resident_bytes: int = 0
    budget_bytes: int = 0
    expert_bytes_total: int = 0
    peak_rss_bytes: int = 0
    moe_layers: tuple[int, ...] = ()
    n_experts: int = 0
    resident: frozenset[tuple[int, int]] = frozenset()
    heat: tuple[tuple[float, ...], ...] = ()  # [moe layer][expert], 0..1 (1 = hottest in the layer)

    @property
    def prefetch_accuracy(self) -> float | None:
        """Share of issued prefetches that a demand access used."""
        return self.prefetch_hits / self.prefetch_issued if self.prefetch_issued else None


@dataclass
class StatsTracker:
    backend: str
    has_cache: bool
    moe_layers: tuple[int, ...]
    n_experts: int
    expert_bytes_total: int
    window: int = WINDOW_STEPS
    _steps: deque = field(default_factory=deque)         # (hits, misses, decode, bytes_read, stall_s)
    _layer_steps: deque = field(default_factory=deque)   # per decode step: ((hits, accesses) per layer)
    _totals: Counter = field(default_factory=Counter)  # session sums of the engine's counters
    _heat: list[list[float]] = field(default_factory=list)
    _last: StepEvent | None = None
    _residency: CacheStats | None = None
    _resident: frozenset = frozenset()
    _tokens: int = 0
    _session_tokens: int = 0
    _generating: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)  # add() in the worker, set_residency() in the UI

    def __post_init__(self):
        self._heat = [[0.0] * self.n_experts for _ in self.moe_layers]

    def start_reply(self) -> None:
        self._tokens, self._generating, self._last = 0, True, None

    def end_reply(self) -> None:
        self._generating = False

    def set_residency(self, stats: CacheStats | None) -> None:
        """The cache's state outside a step (after a budget or policy change)."""
        if stats is not None:
            with self._lock:
                self._residency = stats
                self._resident = frozenset(stats.resident_experts)

    def add(self, event: StepEvent) -> None:
        with self._lock:
            self._add(event)

    def _add(self, event: StepEvent) -> None:
        c = event.cache
        decode = event.index > 0
        self._steps.append((c.hits, c.misses, decode, c.bytes_read, c.stall_s))
        self._totals.update(hits=c.hits, misses=c.misses, prefetch_issued=c.prefetch_issued,
                            prefetch_hits=c.prefetch_hits, prefetch_wasted=c.prefetch_wasted)
        if decode and self.has_cache and event.routing:
            self._layer_steps.append(tuple(
                (sum((layer, e) in self._resident for e in set(chosen)), len(set(chosen)))
                for layer, chosen in zip(self.moe_layers, event.routing)))
        self._fold_heat(event.routing)
        for q in (self._steps, self._layer_steps):
            while len(q) > self.window:
                q.popleft()
        if self.has_cache:
            self._resident = frozenset(c.resident_experts)
            self._residency = c
        self._last = event
        self._tokens += 1
        self._session_tokens += 1

    def _fold_heat(self, routing: tuple[tuple[int, ...], ...]) -> None:
        for row, chosen in zip(self._heat, routing):
            for e in range(len(row)):
                row[e] *= HEAT_DECAY
            for e in chosen:
                if 0 <= e < len(row):
                    row[e] += 1.0

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> StatsSnapshot:
        steps = list(self._steps)
        hits, misses = sum(s[0] for s in steps), sum(s[1] for s in steps)
        decoded = [s for s in steps if s[2]]
        layer_hits = []
        for i in range(len(self.moe_layers)):
            h = sum(step[i][0] for step in self._layer_steps if i < len(step))
            n = sum(step[i][1] for step in self._layer_steps if i < len(step))
            layer_hits.append(h / n if n else None)
        t, last, res = self._totals, self._last, self._residency
        heat = tuple(tuple(v / max(max(row), 1e-9) for v in row) for row in self._heat)
        return StatsSnapshot(
            backend=self.backend, has_cache=self.has_cache, generating=self._generating,
            tokens=self._tokens, session_tokens=self._session_tokens,
            tokens_per_s=last.tokens_per_s if last else 0.0,
            hit_rate=_ratio(hits, hits + misses) if self.has_cache else None,
            session_hit_rate=_ratio(t["hits"], t["hits"] + t["misses"]) if self.has_cache else None,
            layer_hit_rate=tuple(layer_hits) if self.has_cache else (),
            bytes_per_token=sum(s[3] for s in decoded) / len(decoded) if self.has_cache and decoded else None,
            stall_s_per_token=sum(s[4] for s in decoded) / len(decoded) if self.has_cache and decoded else None,
            prefetch_issued=t["prefetch_issued"], prefetch_hits=t["prefetch_hits"],
            prefetch_wasted=t["prefetch_wasted"],
            resident_bytes=res.resident_bytes if res else 0, budget_bytes=res.budget_bytes if res else 0,
            expert_bytes_total=self.expert_bytes_total,
            peak_rss_bytes=last.peak_rss_bytes if last else 0,
            moe_layers=self.moe_layers, n_experts=self.n_experts, resident=self._resident, heat=heat)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None
