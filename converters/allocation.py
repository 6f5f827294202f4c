"""Bit allocation: one type per expert, least expected output error within a byte budget.

A multiple-choice knapsack: every expert takes exactly one of its options (a type, its bytes,
its expected error), the bytes of all choices stay within the budget, the summed error is
minimal. Solved exactly by dynamic programming over the budget in units of the gcd of all option
sizes when that table is small enough; otherwise greedily along each expert's lower convex hull
(the classic MCKP greedy), which comes with a bound: the LP relaxation's optimum is a lower bound
on the true optimum, so `gap = objective - lower_bound` is the most the greedy answer can lose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Hashable

import numpy as np

from edgemoe.converters.errors import ConvertError

DP_MAX_CELLS = 20_000_000  # items x budget units of the exact table (int8 choices: ~20 MB)


class AllocationError(ConvertError):
    """A budget no choice of types can meet."""


@dataclass(frozen=True)
class Option:
    label: Hashable  # what the caller chooses by (a ggml type)
    nbytes: int
    cost: float


@dataclass(frozen=True)
class Allocation:
    choice: dict[Hashable, Hashable]  # item -> chosen option label
    total_bytes: int
    objective: float                  # summed cost of the choice
    lower_bound: float                # no choice within the budget has a lower cost
    method: str                       # "exact" (dynamic programming) or "greedy" (convex hull)

    @property
    def gap(self) -> float:
        return max(0.0, self.objective - self.lower_bound)


def minimum_bytes(options: dict[Hashable, list[Option]]) -> int:
    return sum(min(o.nbytes for o in opts) for opts in options.values())


def maximum_bytes(options: dict[Hashable, list[Option]]) -> int:
    return sum(max(o.nbytes for o in opts) for opts in options.values())


def allocate(options: dict[Hashable, list[Option]], budget_bytes: int, exact: bool | None = None) -> Allocation:
    """exact: True forces dynamic programming, False the greedy; None picks by table size."""
    if not options or any(not opts for opts in options.values()):
        raise AllocationError("nothing to allocate: every expert needs at least one type option")
    low = minimum_bytes(options)
    if budget_bytes < low:
        raise AllocationError(f"expert budget {budget_bytes:,} bytes is below the minimum {low:,} bytes "
                              "(every expert at its smallest type)")
    items = list(options)
    unit = reduce(math.gcd, (o.nbytes for opts in options.values() for o in opts))
    cells = len(items) * (budget_bytes // unit + 1)
    if exact or (exact is None and cells <= DP_MAX_CELLS):
        return _exact(options, items, budget_bytes, unit)
    return _greedy(options, items, budget_bytes)


def _exact(options, items, budget_bytes: int, unit: int) -> Allocation:
    cap = min(budget_bytes, maximum_bytes(options)) // unit
    best = np.zeros(cap + 1)  # best[c]: least cost of the items so far within c units
    choices = np.zeros((len(items), cap + 1), dtype=np.int16)
    for i, item in enumerate(items):
        new = np.full(cap + 1, np.inf)
        for j, o in enumerate(options[item]):
            w = o.nbytes // unit
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + o.cost
            better = cand < new
            new[better] = cand[better]
            choices[i, better] = j
        best = new
    c = cap
    choice = {}
    for i in range(len(items) - 1, -1, -1):
        o = options[items[i]][choices[i, c]]
        choice[items[i]] = o.label
        c -= o.nbytes // unit
    return _result(options, choice, float(best[cap]), "exact")


def _hull(opts: list[Option]) -> list[Option]:
    """Options on the lower convex hull of (bytes, cost), cheapest first; dominated ones dropped."""
    pts = []
    for o in sorted(opts, key=lambda o: (o.nbytes, o.cost)):
        if pts and o.cost >= pts[-1].cost:
            continue  # more bytes, no less error
        while len(pts) >= 2 and _slope(pts[-2], pts[-1]) >= _slope(pts[-1], o):
            pts.pop()
        pts.append(o)
    return pts


def _slope(a: Option, b: Option) -> float:
    return (b.cost - a.cost) / (b.nbytes - a.nbytes)


def _greedy(options, items, budget_bytes: int) -> Allocation:
    hulls = {item: _hull(options[item]) for item in items}
    at = {item: 0 for item in items}
    used = sum(h[0].nbytes for h in hulls.values())
    # upgrade steps, best error saved per byte first; along one hull the slopes only get flatter,
    # so this order takes each expert's steps in sequence
    steps = sorted(((_slope(h[k], h[k + 1]), item, k) for item, h in hulls.items() for k in range(len(h) - 1)),
                   key=lambda s: s[0])
    lower = None
    blocked = set()
    for slope, item, k in steps:
        if item in blocked or at[item] != k:
            continue
        h = hulls[item]
        extra = h[k + 1].nbytes - h[k].nbytes
        if used + extra > budget_bytes:
            if lower is None:  # LP relaxation: the first step that does not fit, taken fractionally
                cost_now = sum(hulls[i][at[i]].cost for i in items)
                lower = cost_now + slope * (budget_bytes - used)
            blocked.add(item)
            continue
        at[item] = k + 1
        used += extra
    choice = {item: hulls[item][at[item]].label for item in items}
    objective = sum(hulls[item][at[item]].cost for item in items)
    return _result(options, choice, objective if lower is None else min(lower, objective), "greedy")


def _result(options, choice, lower_bound: float, method: str) -> Allocation:
    picked = {item: next(o for o in options[item] if o.label == label) for item, label in choice.items()}
    objective = sum(o.cost for o in picked.values())
    return Allocation(choice, sum(o.nbytes for o in picked.values()), objective,
                      min(lower_bound, objective), method)
