"""Eviction policies for the expert cache. Keys are (layer, expert) pairs.

Each policy sees every access (`touch`, with the tokens routed to the expert) and picks a victim
among evictable keys. `split` (the default) gives each MoE layer a share of the budget from its
own hit-rate curves, measured online (edgemoe.budget_split). Belady is the offline optimum on a
recorded routing trace: the bound every online policy is reported against. Random is reported
too: when routing is near-uniform LRU/LFU barely beat it.
"""
from __future__ import annotations

import bisect
import math
import random
from collections import defaultdict

from edgemoe.errors import InputError

from edgemoe.budget_split import LayerCurves, allocate

Key = tuple[int, int]


class Policy:
    name = "base"

    def bind(self, residency) -> None:
        """The `Residency` this policy decides for (sizes, budget); called before any access."""

    def touch(self, key: Key, clock: int, slots: int = 1) -> None:
        """`key` was accessed at global access number `clock`, by `slots` tokens."""

    def touch_step(self, keys: list[Key], clocks: list[int], slots: list[int]) -> None:
        """One layer step's accesses (distinct keys of one layer), as `touch` of each in order."""
        for key, clock, n in zip(keys, clocks, slots):
            self.touch(key, clock, n)

    def admit(self, key: Key) -> None:
        """`key` became resident (a demand load or a prefetch)."""

    def forget(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, candidates: list[Key], clock: int) -> Key:
        raise NotImplementedError

    def choose(self, resident: set[Key], evictable, clock: int) -> Key | None:
        """The key to evict among `resident` keys for which `evictable(key)` holds; None when
        none may go."""
        candidates = [k for k in resident if evictable(k)]
        return self.victim(candidates, clock) if candidates else None


class LRU(Policy):
    name = "lru"

    def __init__(self):
        self.last: dict[Key, int] = {}

    def touch(self, key, clock, slots=1):
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

    def touch(self, key, clock, slots=1):
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

    def touch(self, key, clock, slots=1):
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


class LayerSplit(Policy):
    """Every MoE layer's share of the budget follows its own hit-rate curves, measured online
    (edgemoe.budget_split): the victim is the expert whose slot buys the fewest hits per token
    per byte by its layer's curve (on a tie the one fewer tokens were routed to, then the least
    recently used). A layer's curves, ordering and worths are recomputed when its step ends
    (when a different layer is touched), so eviction is a scan of each layer's cheapest expert."""
    name = "split"

    def __init__(self):
        self.curves: dict[int, LayerCurves] = {}
        self.slot_bytes: dict[int, int] = {}
        self.resident: dict[int, list[int]] = {}   # per layer: resident experts, cheapest first
        self.current: int | None = None            # the layer whose step is being touched

    def bind(self, residency):
        self.residency, self.sizes = residency, residency.sizes
        by_layer: dict[int, list[Key]] = defaultdict(list)
        for key in residency.sizes:
            by_layer[key[0]].append(key)
        self.curves = {l: LayerCurves(1 + max(e for _, e in keys)) for l, keys in sorted(by_layer.items())}
        self.slot_bytes = {l: max(sum(self.sizes[k] for k in keys) // len(keys), 1) for l, keys in by_layer.items()}
        self.resident = {l: [] for l in self.curves}
        self.current = None
        self.unplanned: dict[int, int] = {}  # layer -> its share at its last step, not planned yet

    def _key(self, layer: int, e: int) -> tuple[float, float, float]:
        c = self.curves[layer]
        return c.worth[e] / self.slot_bytes[layer], c.count[e], c.last[e]

    def _end_step(self) -> None:
        layer, self.current = self.current, None
        if layer is None:
            return
        share = len(self.resident[layer])
        if self.residency.holds_everything():
            # every expert fits: no victim is chosen, so the plan (~0.15 ms per layer step, most of
            # this policy's cost at a full budget) waits until one is (a budget lowered live)
            self.curves[layer].end_step(None)
            self.unplanned[layer] = share
            return
        self.curves[layer].end_step(share)
        self._sort(layer)

    def _sort(self, layer: int) -> None:
        self.resident[layer].sort(key=lambda e: self._key(layer, e))

    def _plan_pending(self, layer: int | None = None) -> None:
        """Plan the layers (or `layer`) whose steps were applied without a plan, at their shares then."""
        for l in [layer] if layer is not None else list(self.unplanned):
            if l in self.unplanned:
                self.curves[l].replan(self.unplanned.pop(l))
                self._sort(l)

    def touch(self, key, clock, slots=1):
        if key[0] != self.current:
            self._end_step()
            self.current = key[0]
        self.curves[key[0]].access(key[1], clock, slots)

    def touch_step(self, keys, clocks, slots):
        """One layer step: every rank read from the same state (as `touch` of each reads it: the
        step is applied at its end), in one compare (~0.1 ms a 16-layer token less)."""
        layer = keys[0][0]
        if layer != self.current:
            self._end_step()
            self.current = layer
        self.curves[layer].access_many([e for _, e in keys], clocks, slots)

    def admit(self, key):
        layer, e = key
        self._plan_pending(layer)
        bisect.insort(self.resident[layer], e, key=lambda x: self._key(layer, x))

    def forget(self, key):
        self.resident[key[0]].remove(key[1])

    def shares(self) -> dict[int, int]:
        """The split the curves ask for now: target bytes per layer, their sum <= the budget."""
        self._plan_pending()
        experts = allocate(self.curves, self.slot_bytes, self.residency.budget_bytes)
        return {l: n * self.slot_bytes[l] for l, n in experts.items()}

    def choose(self, resident, evictable, clock):
        self._plan_pending()
        best = None
        for layer, es in self.resident.items():
            for e in es:  # cheapest first: the first evictable one is the layer's candidate
                if evictable((layer, e)):
                    k = self._key(layer, e)
                    if best is None or k < best[0]:
                        best = (k, (layer, e))
                    break
        return best[1] if best else None


POLICIES = ("lru", "lfu", "hybrid", "random", "split", "belady")
ONLINE_POLICIES = ("split", "lru", "lfu", "hybrid", "random")  # selectable while running: belady needs the future
DEFAULT_POLICY = "split"  # chosen on real Qwen3-30B-A3B routing and the demo's traces: docs/BENCHMARKS.md


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
    if name == "split":
        return LayerSplit()
    if name == "belady":
        if future is None:
            raise InputError("the belady policy needs a recorded routing trace (the future accesses); "
                             "record one with `edgemoe trace` and pass it with --trace")
        return Belady(future)
    raise InputError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
