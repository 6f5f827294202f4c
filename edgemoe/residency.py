"""Which experts are resident, under a byte budget: the bookkeeping shared by the real
ExpertCache (which also does the I/O) and the trace simulator (which does none).

Prefetched experts wait for their layer: until it routes they are never evicted by another
prefetch. A prefetch its layer routed past without using is stale: it goes first, oldest first,
before anything the policy would choose, so a wrong guess displaces nothing for longer than it
takes the next load to need room. (Kept at its own worth, a wrong guess stayed and pushed out
experts the policy had chosen to keep: docs/BENCHMARKS.md, #17.)

A token computed over every expert held (the engine's one-graph decode, the budgeted llama
mode's default layout) has nothing to decide, so its accesses are counted as hits at once and
told to the policy only when it next decides something (`count_held`): a Qwen3-shaped token's 16
layer steps cost the split policy ~0.45 ms, 2% of the token, for curves nothing reads at that
budget. At most DEFERRED_STEPS wait (the oldest are dropped), so the first decision after a long
full-budget run (a budget lowered live) tells the policy at most ~0.5 s of steps."""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from edgemoe.errors import InputError
from edgemoe.policies import Key, Policy


DEFERRED_STEPS = 16_384  # layer steps: 1,024 tokens of a 16-layer model


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
        self.total_bytes = sum(sizes.values())  # every expert
        check_budget(budget_bytes, self.largest_bytes)
        self.budget_bytes = budget_bytes
        self.resident: set[Key] = set()
        self.resident_bytes = 0
        self.version = 0  # bumped whenever `resident` changes (step_stats reuses its snapshot till then)
        self.in_flight_bytes = 0
        self.pins: Counter[Key] = Counter()
        self.all_pinned = 0  # > 0 while a whole-token graph computes over every resident expert
        self.unused_prefetch: set[Key] = set()            # prefetched, not used yet
        self.waiting: dict[int, set[Key]] = {}            # per layer: unused prefetches it has not routed past
        self.stale: dict[Key, None] = {}                  # unused prefetches their layer routed past, oldest first
        self.clock = 0
        self.c = Counters()
        self.peak_bytes = 0
        self.evicted: list[Key] = []  # victims since the owner last drained this list
        self.deferred: deque = deque(maxlen=DEFERRED_STEPS)  # (keys, clocks, slots) not told yet
        self.policy = policy

    @property
    def policy(self) -> Policy:
        """The policy, told of the deferred steps first (every use of it goes through here)."""
        while self.deferred:
            self._policy.touch_step(*self.deferred.popleft())
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """A new policy learns the sizes, the budget and what is resident already (not the old
        one's deferred steps: it starts from now, as it always has)."""
        self.deferred.clear()
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
        # the layer routes: its guesses not touched in this step missed. A step's keys are touched
        # together before any load (acquire_many); a layer too big for the budget is acquired one
        # key at a time, and there a later key's right guess may be taken for stale and go first
        for k in sorted(self.waiting.pop(key[0], ())):
            self.stale[k] = None
        self.stale.pop(key, None)

    def touch_step(self, keys: list[Key], slots: list[int]) -> None:
        """`touch` of each of one layer step's keys (distinct, one layer), the policy told at once."""
        if not keys:
            return
        self.policy.touch_step(keys, self._tick(len(keys)), slots)
        for k in sorted(self.waiting.pop(keys[0][0], ())):
            self.stale[k] = None
        for key in keys:
            self.stale.pop(key, None)

    def count_held(self, steps: list[tuple[list[Key], list[int]]]) -> None:
        """A token's layer steps computed over held experts, each (keys ascending, token slots):
        `touch_step` then `hit` of each key, the policy told later (see the module's docstring).
        With prefetch bookkeeping pending (a guess waits for its layer) the steps are told now."""
        if self.unused_prefetch or self.waiting or self.stale:
            for keys, slots in steps:
                self.touch_step(keys, slots)
                for key in keys:
                    self.hit(key)
            return
        for keys, slots in steps:
            if keys:
                self.deferred.append((keys, self._tick(len(keys)), slots))
                self.c.hits += len(keys)

    def _tick(self, n: int) -> list[int]:
        """The clocks of the next n accesses (the clock advances past them)."""
        self.clock += n
        return list(range(self.clock - n + 1, self.clock + 1))

    def hit(self, key: Key) -> None:
        self.c.hits += 1
        if key in self.unused_prefetch:
            self.unused_prefetch.discard(key)
            self.c.prefetch_hits += 1

    def _victim(self, exclude) -> Key | None:
        """A stale prefetch first (oldest first), else the policy's choice; never a pinned key
        nor one in `exclude`."""
        if self.all_pinned:
            return None
        evictable = lambda k: self.pins[k] == 0 and k not in exclude  # noqa: E731
        stale = next((k for k in self.stale if evictable(k)), None)
        return stale if stale is not None else self.policy.choose(self.resident, evictable, self.clock)

    def evict_one(self, exclude: set[Key]) -> bool:
        victim = self._victim(exclude)
        if victim is None:
            return False
        self._evict(victim)
        return True

    def _evict(self, victim: Key) -> None:
        self.stale.pop(victim, None)
        self.waiting.get(victim[0], set()).discard(victim)
        self.resident.discard(victim)
        self.version += 1
        self.resident_bytes -= self.sizes[victim]
        self.policy.forget(victim)
        self.c.evictions += 1
        self.evicted.append(victim)
        if victim in self.unused_prefetch:
            self.unused_prefetch.discard(victim)
            self.c.prefetch_wasted += 1

    def make_room(self, nbytes: int, exclude: set[Key] = frozenset()) -> bool:
        while self.used() + nbytes > self.budget_bytes:
            if not self.evict_one(exclude):
                return False
        return True

    def room_for_prefetch(self, key: Key) -> bool:
        """Make room for prefetching `key` (not resident), evicting neither pinned experts nor
        prefetches still waiting for their layer (stale ones go first); False when none could be
        made. ExpertCache.prefetch and the replay both admit prefetches by this."""
        return self.make_room(self.sizes[key], exclude=set().union(*self.waiting.values()))

    def begin_load(self, key: Key) -> None:
        self.in_flight_bytes += self.sizes[key]

    def abort_load(self, key: Key) -> None:
        self.in_flight_bytes -= self.sizes[key]

    def finish_load(self, key: Key, nbytes_read: int, prefetched: bool) -> None:
        self.in_flight_bytes -= self.sizes[key]
        self.resident.add(key)
        self.version += 1
        self.resident_bytes += self.sizes[key]
        self.policy.admit(key)
        self.c.bytes_read += nbytes_read
        self.peak_bytes = max(self.peak_bytes, self.used())
        if prefetched:
            self.unused_prefetch.add(key)
            self.waiting.setdefault(key[0], set()).add(key)

    def holds_everything(self) -> bool:
        """The budget holds every expert: the engine then loads them all at open (as llama.cpp
        does) and the replay starts from that, so neither counts a cold miss."""
        return self.budget_bytes >= self.total_bytes

    def preload(self, key: Key) -> None:
        """`key` made resident before any step (an open's load): in no counter, no clock tick."""
        self.resident.add(key)
        self.version += 1
        self.resident_bytes += self.sizes[key]
        self.policy.admit(key)
        self.peak_bytes = max(self.peak_bytes, self.used())

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
