"""Eviction policies for the expert cache. Keys are (layer, expert) pairs.

Each policy sees every access (`touch`) and picks a victim among evictable keys. Belady is the
offline optimum on a recorded routing trace: the bound every online policy is reported against.
Random is reported too: when routing is near-uniform LRU/LFU barely beat it.
"""
from __future__ import annotations

import bisect
import math
import random
from collections import defaultdict

from edgemoe.errors import InputError

Key = tuple[int, int]


class Policy:
    name = "base"

    def touch(self, key: Key, clock: int) -> None:
        """`key` was accessed at global access number `clock`."""

    def forget(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, candidates: list[Key], clock: int) -> Key:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def __init__(self):
        self.last: dict[Key, int] = {}

    def touch(self, key, clock):
        self.last[key] = clock

    def forget(self, key):
        self.last.pop(key, None)

    def victim(self, candidates, clock):
        return min(candidates, key=lambda k: self.last.get(k, -1))


class LFU(Policy):
    """Least frequently used; counts survive eviction (routing popularity is a property of the
    expert, not of its current residency), ties broken by recency."""
    name = "lfu"

    def __init__(self):
        self.count: dict[Key, int] = defaultdict(int)
        self.last: dict[Key, int] = {}

    def touch(self, key, clock):
        self.count[key] += 1
        self.last[key] = clock

    def victim(self, candidates, clock):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1)))


class Hybrid(Policy):
    """Frequency + recency (LRFU): each access adds 1 to a score that decays by half every
    `half_life` accesses; evict the lowest score."""
    name = "hybrid"

    def __init__(self, half_life: float = 64.0):
        self.decay = math.log(2) / half_life
        self.score: dict[Key, float] = {}
        self.last: dict[Key, int] = {}

    def _now(self, key, clock):
        return self.score.get(key, 0.0) * math.exp(-self.decay * (clock - self.last.get(key, clock)))

    def touch(self, key, clock):
        self.score[key] = self._now(key, clock) + 1.0
        self.last[key] = clock

    def victim(self, candidates, clock):
        return min(candidates, key=lambda k: self._now(k, clock))


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def victim(self, candidates, clock):
        return self.rng.choice(sorted(candidates))


class Belady(Policy):
    """Evict the key whose next access lies farthest in the future of a known access sequence.

    `future` is the full sequence of demand accesses; the cache's access clock indexes into it.
    """
    name = "belady"

    def __init__(self, future: list[Key]):
        self.positions: dict[Key, list[int]] = defaultdict(list)
        for i, key in enumerate(future):
            self.positions[key].append(i)

    def next_use(self, key: Key, clock: int) -> float:
        pos = self.positions.get(key, [])
        i = bisect.bisect_left(pos, clock)
        return pos[i] if i < len(pos) else math.inf

    def victim(self, candidates, clock):
        return max(candidates, key=lambda k: (self.next_use(k, clock), k))


POLICIES = ("lru", "lfu", "hybrid", "random", "belady")


def make_policy(name: str, future: list[Key] | None = None, seed: int = 0) -> Policy:
    name = name.lower()
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "hybrid":
        return Hybrid()
    if name == "random":
        return RandomPolicy(seed)
    if name == "belady":
        if future is None:
            raise InputError("the belady policy needs a recorded routing trace (the future accesses); "
                             "record one with `edgemoe trace` and pass it with --trace")
        return Belady(future)
    raise InputError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
