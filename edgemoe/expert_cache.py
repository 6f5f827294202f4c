"""ExpertCache: quantized expert bytes under a hard byte budget.

Invariant (asserted by tests on every step): resident bytes + bytes of loads in flight never
exceed `budget_bytes`. A demand miss evicts by policy until the expert fits; a prefetch only
uses room it can make without touching pinned experts or other unused prefetches, and gives
up otherwise. The bookkeeping is `Residency` (shared with the trace simulator); this class adds
the locking and the reads.
"""
from __future__ import annotations

import os
import threading
import time

from edgemoe.events import CacheStats
from edgemoe.expert_store import ExpertSpec, ResidentExpert, read_expert
from edgemoe.gguf_file import ModelFileError
from edgemoe.policies import Key, Policy
from edgemoe.residency import BudgetError, Residency  # noqa: F401  (BudgetError re-exported)


class ExpertCache:
    def __init__(self, path: str | os.PathLike, specs: dict[Key, ExpertSpec], budget_bytes: int, policy: Policy,
                 n_layers: int):
        self.specs, self.n_layers = specs, n_layers
        self.state = Residency({k: s.alloc_bytes for k, s in specs.items()}, budget_bytes, policy)
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.file_size = os.fstat(self.fd).st_size
        self.cond = threading.Condition()
        self.experts: dict[Key, ResidentExpert] = {}
        self.loading: set[Key] = set()

    @property
    def budget_bytes(self) -> int:
        return self.state.budget_bytes

    @property
    def resident_bytes(self) -> int:
        return self.state.resident_bytes

    @property
    def in_flight_bytes(self) -> int:
        return self.state.in_flight_bytes

    @property
    def resident(self) -> set[Key]:
        return set(self.state.resident)

    def _drop_evicted(self) -> None:
        for key in self.state.evicted:
            self.experts.pop(key).close()
        self.state.evicted.clear()

    # ---- demand path --------------------------------------------------------------------
    def acquire(self, key: Key) -> ResidentExpert:
        """The resident expert for `key`, loading it on a miss; pinned until `release`."""
        s = self.state
        with self.cond:
            s.touch(key)
            if key in self.loading:  # a prefetch is bringing it in: wait for it
                t0 = time.perf_counter()
                while key in self.loading:
                    self.cond.wait()
                s.c.stall_s += time.perf_counter() - t0
            if key in s.resident:
                s.hit(key)
                s.pins[key] += 1
                return self.experts[key]
            s.c.misses += 1
            t0 = time.perf_counter()
            while not s.make_room(s.sizes[key]):
                self._drop_evicted()
                self.cond.wait()  # all else pinned or loading: wait for a release
            self._drop_evicted()
            s.begin_load(key)
            self.loading.add(key)
        expert = self._read(key)
        with self.cond:
            self._insert(key, expert, prefetched=False)
            s.c.stall_s += time.perf_counter() - t0
            s.pins[key] += 1
            return expert

    def _read(self, key: Key) -> ResidentExpert:
        try:
            return read_expert(self.fd, self.specs[key], self.file_size)
        except BaseException:
            with self.cond:
                self.loading.discard(key)
                self.state.abort_load(key)
                self.cond.notify_all()
            raise

    def release(self, key: Key) -> None:
        with self.cond:
            pins = self.state.pins
            pins[key] -= 1
            if pins[key] <= 0:
                del pins[key]
            self.cond.notify_all()

    def _insert(self, key: Key, expert: ResidentExpert, prefetched: bool) -> None:
        self.loading.discard(key)
        self.experts[key] = expert
        self.state.finish_load(key, sum(p.nbytes for p in self.specs[key].parts), prefetched)
        self.cond.notify_all()

    # ---- prefetch path ------------------------------------------------------------------
    def prefetch(self, key: Key) -> bool:
        """Load `key` if it fits without evicting pinned or still-unused prefetched experts."""
        s = self.state
        with self.cond:
            if key in s.resident or key in self.loading:
                return False
            room = s.make_room(s.sizes[key], exclude=set(s.unused_prefetch))
            self._drop_evicted()
            if not room:
                return False
            s.begin_load(key)
            self.loading.add(key)
            s.c.prefetch_issued += 1
        try:
            expert = self._read(key)
        except (OSError, ModelFileError):
            return False  # the demand path will meet the same error and report it
        with self.cond:
            self._insert(key, expert, prefetched=True)
        return True

    # ---- control ------------------------------------------------------------------------
    def set_budget(self, budget_bytes: int) -> None:
        """Resize now: evicts unpinned experts until the new budget holds."""
        with self.cond:
            self.state.set_budget(budget_bytes)
            self._drop_evicted()

    def set_policy(self, policy: Policy) -> None:
        with self.cond:
            self.state.policy = policy
            for key in self.state.resident:
                policy.touch(key, self.state.clock)

    def step_stats(self) -> CacheStats:
        """Counters since the previous call, plus the current residency."""
        with self.cond:
            per_layer = [0] * self.n_layers
            for layer, e in self.state.resident:
                per_layer[layer] += self.state.sizes[(layer, e)]
            c = self.state.take_counters()
            return CacheStats(c.hits, c.misses, c.evictions, c.prefetch_issued, c.prefetch_hits, c.prefetch_wasted,
                              c.bytes_read, c.stall_s, self.state.resident_bytes, self.state.budget_bytes,
                              tuple(per_layer), tuple(sorted(self.state.resident)))

    def close(self) -> None:
        with self.cond:
            for expert in self.experts.values():
                expert.close()
            self.experts.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
