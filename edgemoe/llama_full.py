"""The budgeted llama mode at a budget that holds every expert: llama.cpp's own default layout.

With every expert resident there is nothing for the cache to decide, while the slots layout
(mmap, no CPU repack, slots moved over file pages: edgemoe/llama_slots.py) costs speed: llama.cpp's
CPU repack alone is 1.25-1.39x on the slices, and the budgeted mode at full budget in the slots
layout decoded at 0.52x plain llama.cpp. So at such a budget BudgetedLlama loads the file with
the same parameters as plain `--backend llama` (edgemoe/llama_load.py, default layout), keeps the
eval callback only to read `ffn_moe_topk-<layer>`, and counts every routed expert as a hit here,
so the StepEvent stream (chat, bench, tune, trace) sees the cache as before: every expert
resident, the budget as given, hits counted, no misses.

bytes_read counts what edgemoe's cache reads from the file: 0 in this layout, every step.
llama.cpp reads each expert once while it loads the model (its own reads, as plain llama.cpp's
load, in no step's counters), and the cache's loader reads nothing (`loader.stats()` is empty).
"""
from __future__ import annotations

import os

from edgemoe.errors import InputError
from edgemoe.expert_cache import ExpertCache
from edgemoe.expert_store import ExpertSpec
from edgemoe.policies import Key, Policy
from edgemoe.residency import BudgetError


def default_layout(full_layout: bool | None, budget_bytes: int, full_bytes: int) -> bool:
    """Whether to run llama.cpp's default layout. full_layout: None = when the budget holds every
    expert (`full_bytes`, as the budgeted mode counts them), True/False = always/never."""
    if full_layout and budget_bytes < full_bytes:
        raise InputError(f"full_layout=True needs a budget that holds every expert ({full_bytes / 2**20:.2f} MiB "
                         f"as llama.cpp maps them), not {budget_bytes / 2**20:.2f} MiB; raise the budget or leave "
                         "full_layout unset")
    return budget_bytes >= full_bytes if full_layout is None else full_layout


class LoadedExpertCache(ExpertCache):
    """The engine's ExpertCache over experts that llama.cpp loaded into its own buffers: every
    expert is resident from the start and nothing is ever read, evicted or prefetched."""

    def __init__(self, path: str | os.PathLike, specs: dict[Key, ExpertSpec], sizes: dict[Key, int],
                 budget_bytes: int, policy: Policy, n_layers: int):
        if budget_bytes < sum(sizes.values()):
            raise BudgetError(f"{budget_bytes / 2**20:.2f} MiB does not hold every expert; the slots layout "
                              "(MappedExpertCache) serves smaller budgets")
        super().__init__(path, specs, budget_bytes, policy, n_layers, sizes=sizes)
        with self.cond:
            for key in sorted(specs):  # llama.cpp read them while loading: no bytes of ours, no step's count
                self.state.preload(key)

    def route(self, keys: list[Key], n_slots: list[int]) -> None:
        """One layer's routing (distinct keys, the tokens routed to each): all hits."""
        self.count_held_step([(keys, n_slots)])

    def count_unseen(self, n_accesses: int) -> None:
        """Accesses of steps whose routing was not read (one token each: its top-k experts,
        distinct and all resident): hits. The policy is not told which: in this layout it never
        chooses a victim (a smaller budget reopens the model with a new cache)."""
        with self.cond:
            self.state.c.hits += n_accesses
            self.state.c.token_slots += n_accesses

    def set_budget(self, budget_bytes: int) -> None:
        """Only budgets that still hold every expert: llama.cpp's buffers cannot give one back
        (BudgetedLlama reopens the model in the slots layout for a smaller one)."""
        if budget_bytes < self.state.resident_bytes:
            raise BudgetError(f"{budget_bytes / 2**20:.2f} MiB does not hold every expert, which llama.cpp's default "
                              "layout keeps loaded; reopen the model in the slots layout for a smaller budget")
        super().set_budget(budget_bytes)
