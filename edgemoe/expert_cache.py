"""ExpertCache: quantized expert bytes under a hard byte budget.

Invariant (asserted by tests on every step): resident bytes + bytes of loads in flight never
exceed `budget_bytes`. A demand miss evicts by policy until the expert fits; a prefetch only
uses room it can make without touching pinned experts or other unused prefetches, and gives
up otherwise.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

from edgemoe.events import CacheStats
from edgemoe.expert_store import ExpertSpec, ResidentExpert, read_expert
from edgemoe.gguf_file import ModelFileError
from edgemoe.policies import Key, Policy


class BudgetError(ValueError):
    """A budget that cannot hold even one expert."""


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0


class ExpertCache:
    def __init__(self, path: str | os.PathLike, specs: dict[Key, ExpertSpec], budget_bytes: int, policy: Policy,
                 n_layers: int):
        self.specs, self.policy, self.n_layers = specs, policy, n_layers
        self.largest_bytes = max((s.alloc_bytes for s in specs.values()), default=0)
        self.total_bytes = sum(s.alloc_bytes for s in specs.values())
        self._check_budget(budget_bytes)
        self.budget_bytes = budget_bytes
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.file_size = os.fstat(self.fd).st_size
        self.cond = threading.Condition()
        self.resident: dict[Key, ResidentExpert] = {}
        self.loading: set[Key] = set()
        self.in_flight_bytes = 0
        self.pins: Counter[Key] = Counter()
        self.unused_prefetch: set[Key] = set()
        self.clock = 0
        self.c = _Counters()
        self.peak_bytes = 0

    def _check_budget(self, budget_bytes: int) -> None:
        if budget_bytes < self.largest_bytes:
            raise BudgetError(f"expert budget {budget_bytes / 2**20:.2f} MiB is below the largest expert "
                              f"({self.largest_bytes / 2**20:.2f} MiB); raise --budget to at least that")

    # ---- accounting ---------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return sum(r.spec.alloc_bytes for r in self.resident.values())

    def _used(self) -> int:
        return self.resident_bytes + self.in_flight_bytes

    def _evict_one(self, exclude: set[Key]) -> bool:
        candidates = [k for k in self.resident if self.pins[k] == 0 and k not in exclude]
        if not candidates:
            return False
        victim = self.policy.victim(candidates, self.clock)
        expert = self.resident.pop(victim)
        expert.close()
        self.policy.forget(victim)
        self.c.evictions += 1
        if victim in self.unused_prefetch:
            self.unused_prefetch.discard(victim)
            self.c.prefetch_wasted += 1
        return True

    def _make_room(self, nbytes: int, exclude: set[Key]) -> bool:
        while self._used() + nbytes > self.budget_bytes:
            if not self._evict_one(exclude):
                return False
        return True

    # ---- demand path --------------------------------------------------------------------
    def acquire(self, key: Key) -> ResidentExpert:
        """The resident expert for `key`, loading it on a miss; pinned until `release`."""
        spec = self.specs[key]
        with self.cond:
            self.clock += 1
            self.policy.touch(key, self.clock)
            if key in self.loading:  # a prefetch is bringing it in: wait for it
                t0 = time.perf_counter()
                while key in self.loading:
                    self.cond.wait()
                self.c.stall_s += time.perf_counter() - t0
            if key in self.resident:
                self.c.hits += 1
                if key in self.unused_prefetch:
                    self.unused_prefetch.discard(key)
                    self.c.prefetch_hits += 1
                self.pins[key] += 1
                return self.resident[key]
            self.c.misses += 1
            t0 = time.perf_counter()
            while not self._make_room(spec.alloc_bytes, exclude=set()):
                self.cond.wait()  # everything evictable is pinned or loading: wait for a release
            self.loading.add(key)
            self.in_flight_bytes += spec.alloc_bytes
        try:
            expert = read_expert(self.fd, spec, self.file_size)
        except BaseException:
            with self.cond:
                self.loading.discard(key)
                self.in_flight_bytes -= spec.alloc_bytes
                self.cond.notify_all()
            raise
        with self.cond:
            self._insert(key, expert, spec)
            self.c.stall_s += time.perf_counter() - t0
            self.pins[key] += 1
            return expert

    def release(self, key: Key) -> None:
        with self.cond:
            self.pins[key] -= 1
            if self.pins[key] <= 0:
                del self.pins[key]
            self.cond.notify_all()

    def _insert(self, key: Key, expert: ResidentExpert, spec: ExpertSpec) -> None:
        self.loading.discard(key)
        self.in_flight_bytes -= spec.alloc_bytes
        self.resident[key] = expert
        self.c.bytes_read += sum(p.nbytes for p in spec.parts)
        self.peak_bytes = max(self.peak_bytes, self._used())
        self.cond.notify_all()

    # ---- prefetch path ------------------------------------------------------------------
    def prefetch(self, key: Key) -> bool:
        """Load `key` if it fits without evicting pinned or still-unused prefetched experts."""
        spec = self.specs[key]
        with self.cond:
            if key in self.resident or key in self.loading:
                return False
            if not self._make_room(spec.alloc_bytes, exclude=set(self.unused_prefetch)):
                return False
            self.loading.add(key)
            self.in_flight_bytes += spec.alloc_bytes
            self.c.prefetch_issued += 1
        try:
            expert = read_expert(self.fd, spec, self.file_size)
        except (OSError, ModelFileError):
            with self.cond:
                self.loading.discard(key)
                self.in_flight_bytes -= spec.alloc_bytes
                self.cond.notify_all()
            return False  # the demand path will hit the same error and report it
        with self.cond:
            self._insert(key, expert, spec)
            self.unused_prefetch.add(key)
        return True

    # ---- control ------------------------------------------------------------------------
    def set_budget(self, budget_bytes: int) -> None:
        """Resize now: evicts unpinned experts until the new budget holds."""
        self._check_budget(budget_bytes)
        with self.cond:
            self.budget_bytes = budget_bytes
            while self._used() > budget_bytes and self._evict_one(exclude=set()):
                pass

    def set_policy(self, policy: Policy) -> None:
        with self.cond:
            self.policy = policy
            for key in self.resident:
                policy.touch(key, self.clock)

    def step_stats(self) -> CacheStats:
        """Counters since the previous call, plus the current residency."""
        with self.cond:
            per_layer = [0] * self.n_layers
            for (layer, _), r in self.resident.items():
                per_layer[layer] += r.spec.alloc_bytes
            c, self.c = self.c, _Counters()
            return CacheStats(c.hits, c.misses, c.evictions, c.prefetch_issued, c.prefetch_hits, c.prefetch_wasted,
                              c.bytes_read, c.stall_s, self.resident_bytes, self.budget_bytes, tuple(per_layer),
                              tuple(sorted(self.resident)))

    def close(self) -> None:
        with self.cond:
            for expert in self.resident.values():
                expert.close()
            self.resident.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
