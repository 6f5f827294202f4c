"""Per-layer hit-rate curves of the expert cache, measured online, and the worth of each expert.

Real routing is not alike across layers: early layers of Qwen3-30B-A3B spread over most of their
128 experts, deeper ones concentrate on a few, and a just-used expert is chosen again by the next
token far more often in some layers than in others. One global recency (or frequency) order
gives each layer room in proportion to how many distinct experts it touched lately (or to raw
counts), not to what the room buys there.

Each layer ranks its own experts under several orderings: LRU, LRFU with half-lives of 1, 2, 4, ...
64 tokens (a geometric grid from recency to frequency, not fitted to any trace) and LFU. When a
layer's step routes, the rank each chosen expert had under each ordering just before the step is
counted: with a share of c experts kept in that order, the access would have hit iff its rank
was below c. The cumulative counts are the layer's hit-rate curve per ordering, for every share
size at once (for LRU this is Mattson's stack distance). The layer orders its experts by the
ordering whose curve is highest around the share it holds now (that share and one expert either
side), and each expert's worth is the slope of the concave hull of the layer's best curve at that
expert's rank, per byte: the hits per token its slot buys. Evicting the expert of least worth
across all layers is the greedy form of utility-based cache partitioning (Qureshi & Patt 2006):
every layer's share follows its own curve, and `allocate` states that split. Counts weigh each
expert by the tokens routed to it (a prompt's prefill counts each of its tokens). Nothing is
fitted offline: the curves start empty and grow with every step.
"""
from __future__ import annotations

import numpy as np

HALF_LIVES = (1, 2, 4, 8, 16, 32, 64)  # tokens; LRU and LFU are the two ends of the same family
ORDERINGS = ("lru",) + tuple(f"lrfu{h}" for h in HALF_LIVES) + ("lfu",)
_ROWS = np.arange(len(ORDERINGS))
_LFU = ORDERINGS.index("lfu")
_KEEP = np.array([2.0 ** (-1.0 / h) for h in HALF_LIVES])[:, None]  # per step, each half-life's decay


class LayerCurves:
    """One layer: recency, token counts, decayed counts, and rank histograms per ordering.

    Accesses of a step are recorded with `access` (ranks taken on the state before the step) and
    applied by `end_step`, so the experts one step chose together do not outrank each other."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.last = np.full(n_experts, -1.0)         # [E] clock of the last access
        self.count = np.zeros(n_experts)             # [E] token slots routed to each expert
        self.decayed = np.zeros((len(HALF_LIVES), n_experts))        # [H, E] per half-life
        self.at_rank = np.zeros((len(ORDERINGS), n_experts))        # [O, E] accesses at rank r
        self.pending: list[tuple[int, int, int]] = []  # (expert, clock, slots) of this step
        self.ordering = "lfu"
        self.worth = np.zeros(n_experts)             # [E] hits per token of each expert's slot
        self.slope = np.zeros(n_experts + 1)
        self._values: np.ndarray | None = None       # [O, E] keep-values, until the state changes

    def value_matrix(self) -> np.ndarray:
        """[O, E] keep-value under each ordering (higher = kept longer); ties by recency. One
        matrix for all orderings: an access ranks its expert under all of them in one compare
        (on Qwen3's 128 experts x top-8 the per-ordering loop cost ~10% of a budgeted token)."""
        if self._values is None:
            tie = self.last * 1e-12
            self._values = np.vstack([self.last[None], self.decayed + tie, (self.count + tie)[None]])
        return self._values

    def access(self, e: int, clock: int, slots: int = 1) -> None:
        if self.last[e] >= 0:  # a first access hits at no share size
            v = self.value_matrix()
            self.at_rank[_ROWS, np.count_nonzero(v > v[:, e:e + 1], axis=1)] += 1
        self.pending.append((e, clock, slots))

    def access_many(self, experts: list[int], clocks: list[int], slots: list[int]) -> None:
        """`access` of each (distinct) expert, their ranks compared at once."""
        seen = [e for e in experts if self.last[e] >= 0]
        if seen:
            v = self.value_matrix()
            ranks = np.count_nonzero(v[:, None, :] > v[:, seen][:, :, None], axis=2)   # [O, n]
            # ranks may repeat within a row (equal values): bincount adds each (np.add.at, ~3x slower)
            flat = (ranks + (_ROWS * self.n_experts)[:, None]).ravel()
            self.at_rank += np.bincount(flat, minlength=self.at_rank.size).reshape(self.at_rank.shape)
        self.pending.extend(zip(experts, clocks, slots))

    def end_step(self, resident_experts: int | None) -> None:
        """Apply the step's accesses; then `replan` at that share (None: the caller replans later,
        with the share it had now: nothing in between reads the plan)."""
        if not self.pending:
            return
        chosen = np.zeros(self.n_experts)
        for e, clock, slots in self.pending:
            self.last[e] = clock
            self.count[e] += slots
            chosen[e] = 1.0
        self.decayed *= _KEEP
        self.decayed += (1.0 - _KEEP) * chosen
        self._values = None
        self.pending.clear()
        if resident_experts is not None:
            self.replan(resident_experts)

    def curve(self, ordering: str) -> np.ndarray:
        """[E + 1] accesses so far that a share of c experts (c = 0..E) kept in `ordering` would
        have hit."""
        return np.concatenate(([0.0], np.cumsum(self.at_rank[ORDERINGS.index(ordering)])))

    def replan(self, resident_experts: int) -> None:
        """Best ordering at the layer's current size, hull slopes of the best curve, and each
        expert's worth (the slope at its rank). Runs once per layer step inside the eval callback,
        where each numpy call costs several us (llama.cpp's compute has just flushed the caches):
        few calls, the hull in plain Python."""
        cum = np.cumsum(self.at_rank, axis=1)  # [O, E]: curve point c (c = 1..E) is cum[:, c - 1]; point 0 is 0
        at = min(resident_experts, self.n_experts)
        # the highest curve over the sizes the layer holds while it runs (points at-1..at+1): its
        # share moves by one expert with each miss or eviction, and one point of a short history's
        # curve is mostly noise (the demo's 8-expert layers switched orderings on one-access
        # leads); on a tie frequency, then the grid's order
        near = cum[:, max(at - 1, 1) - 1:min(at + 2, self.n_experts + 1) - 1].sum(axis=1).tolist()
        best = max(range(len(ORDERINGS)), key=lambda i: (near[i], i == _LFU, -i))
        self.ordering = ORDERINGS[best]
        self.slope = hull_slopes([0.0] + cum.max(axis=0).tolist())
        order = np.argsort(-self.value_matrix()[best], kind="stable")  # experts by rank
        self.worth = np.empty(self.n_experts)
        self.worth[order] = self.slope[1:]


def hull_slopes(curve: list[float]) -> np.ndarray:
    """[len(curve)] slope of the upper concave hull of `curve` on the step into each size
    (index 0 unused): non-increasing, so a layer's deeper ranks are never worth more. The curve
    is cumulative (non-decreasing), so a point level with its predecessor is never a strict
    vertex unless it is the last: such points are skipped before the scan."""
    n = len(curve)
    xs: list[int] = []
    ys: list[float] = []
    for c in range(n):
        h = curve[c]
        if 0 < c < n - 1 and h == curve[c - 1]:
            continue
        while len(xs) >= 2 and (ys[-1] - ys[-2]) * (c - xs[-2]) <= (h - ys[-2]) * (xs[-1] - xs[-2]):
            xs.pop()
            ys.pop()
        xs.append(c)
        ys.append(h)
    slopes = [0.0] * n
    for i in range(1, len(xs)):
        s = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        for c in range(xs[i - 1] + 1, xs[i] + 1):
            slopes[c] = s
    return np.array(slopes)


def allocate(curves: dict[int, LayerCurves], slot_bytes: dict[int, int], budget_bytes: int) -> dict[int, int]:
    """The split the curves ask for: experts per layer, the steepest hull steps per byte first,
    sum of bytes <= budget_bytes. Budget no curve can use yet (flat curves) stays unassigned."""
    steps = sorted((-c.slope[n] / slot_bytes[layer], layer, n) for layer, c in curves.items()
                   for n in range(1, len(c.slope)) if c.slope[n] > 0)
    experts = {layer: 0 for layer in curves}
    left = budget_bytes
    for _, layer, n in steps:  # a layer's slopes never rise, so its steps come in order
        if slot_bytes[layer] > left:
            break
        experts[layer] = n
        left -= slot_bytes[layer]
    return experts
