"""Which experts are resident, under a byte budget: the bookkeeping shared by the real
ExpertCache (which also does the I/O) and the trace simulator (which does none)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from edgemoe.errors import InputError
from edgemoe.policies import Key, Policy


class BudgetError(InputError):
    """A budget that cannot hold even one expert."""


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    low_served: int = 0
    low_token_slots: int = 0
    token_slots: int = 0


class Residency:
    def __init__(self, sizes: dict[Key, int], budget_bytes: int, policy: Policy):
        self.sizes = sizes
        self.largest_bytes = max(sizes.values(), default=0)
        check_budget(budget_bytes, self.largest_bytes)
        self.budget_bytes = budget_bytes
        self.resident: set[Key] = set()
        self.resident_bytes = 0
        self.in_flight_bytes = 0
        self.pins: Counter[Key] = Counter()
        self.unused_prefetch: set[Key] = set()
        self.clock = 0
        self.c = Counters()
        self.peak_bytes = 0
        self.evicted: list[Key] = []  # victims since the owner last drained this list
        self.policy = policy

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """A new policy learns the sizes, the budget and what is resident already."""
        self._policy = policy
        policy.bind(self)
        for key in sorted(self.resident):
            policy.admit(key)

    def used(self) -> int:
        return self.resident_bytes + self.in_flight_bytes

    def touch(self, key: Key, slots: int = 1) -> None:
        """A demand access by `slots` tokens: advances the clock the policies (and Belady's
        future) index by."""
        self.clock += 1
        self.policy.touch(key, self.clock, slots)

    def hit(self, key: Key) -> None:
        self.c.hits += 1
        if key in self.unused_prefetch:
            self.unused_prefetch.discard(key)
            self.c.prefetch_hits += 1

    def evict_one(self, exclude: set[Key]) -> bool:
        victim = self.policy.choose(self.resident, lambda k: self.pins[k] == 0 and k not in exclude, self.clock)
        if victim is None:
            return False
        self.resident.discard(victim)
        self.resident_bytes -= self.sizes[victim]
        self.policy.forget(victim)
        self.c.evictions += 1
        self.evicted.append(victim)
        if victim in self.unused_prefetch:
            self.unused_prefetch.discard(victim)
            self.c.prefetch_wasted += 1
        return True

    def make_room(self, nbytes: int, exclude: set[Key] = frozenset()) -> bool:
        while self.used() + nbytes > self.budget_bytes:
            if not self.evict_one(exclude):
                return False
        return True

    def begin_load(self, key: Key) -> None:
        self.in_flight_bytes += self.sizes[key]

    def abort_load(self, key: Key) -> None:
        self.in_flight_bytes -= self.sizes[key]

    def finish_load(self, key: Key, nbytes_read: int, prefetched: bool) -> None:
        self.in_flight_bytes -= self.sizes[key]
        self.resident.add(key)
        self.resident_bytes += self.sizes[key]
        self.policy.admit(key)
        self.c.bytes_read += nbytes_read
        self.peak_bytes = max(self.peak_bytes, self.used())
        if prefetched:
            self.unused_prefetch.add(key)

    def set_budget(self, budget_bytes: int) -> None:
        check_budget(budget_bytes, self.largest_bytes)
        self.budget_bytes = budget_bytes
        while self.used() > budget_bytes and self.evict_one(exclude=set()):
            pass

    def take_counters(self) -> Counters:
        c, self.c = self.c, Counters()
        return c


def check_budget(budget_bytes: int, largest_bytes: int) -> None:
    if budget_bytes < largest_bytes:
        raise BudgetError(f"expert budget {budget_bytes / 2**20:.2f} MiB is below the largest expert "
                          f"({largest_bytes / 2**20:.2f} MiB); raise --budget to at least that")
