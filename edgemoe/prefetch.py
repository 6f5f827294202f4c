"""Prefetcher: a background thread that loads the experts the next MoE layer will probably use.

Prediction, while layer l's experts compute: layer l+1's router applied to layer l's MoE input
(hidden states change little between adjacent layers), topped up with per-layer routing
frequency priors. Loads go through `ExpertCache.prefetch`, which never exceeds the budget and
never evicts pinned or not-yet-used prefetched experts. pread releases the GIL, so loads
overlap with compute.
"""
from __future__ import annotations

import queue
import threading
from collections import Counter

import torch

from edgemoe.expert_cache import ExpertCache
from edgemoe.moe import MoEBlock


class Prefetcher:
    def __init__(self, model, cache: ExpertCache, extra_from_prior: int = 0):
        self.cache = cache
        self.blocks: list[MoEBlock] = list(model.moe_blocks)
        self.next_block = {b.layer: nb for b, nb in zip(self.blocks, self.blocks[1:])}
        self.first = self.blocks[0] if self.blocks else None
        self.freq: dict[int, Counter] = {b.layer: Counter() for b in self.blocks}
        self.extra_from_prior = extra_from_prior
        self.queue: queue.Queue = queue.Queue()
        self.generation = 0
        self.predictions = 0
        self._stop = threading.Event()
        for b in self.blocks:
            b.observers.append(self.observe)
        self.thread = threading.Thread(target=self._run, name="edgemoe-prefetch", daemon=True)
        self.thread.start()

    def predict(self, block: MoEBlock, x: torch.Tensor) -> list[int]:
        """Experts `block` will likely route x's tokens to (router speculation + prior)."""
        logits = x[-1:] @ block.router.T  # decode: the newest token decides
        chosen = torch.topk(logits[0], block.cfg.top_k).indices.tolist()
        prior = [e for e, _ in self.freq[block.layer].most_common() if e not in chosen]
        return chosen + prior[: self.extra_from_prior]

    def observe(self, layer: int, x: torch.Tensor) -> None:
        block = self.next_block.get(layer)
        if layer == self.blocks[-1].layer:  # last layer: next token starts at the first block
            self.generation += 1
            block = self.first
            targets = [e for e, _ in self.freq[block.layer].most_common(block.cfg.top_k)]
        else:
            targets = self.predict(block, x)
        self._record(layer, x)
        for e in targets:
            self.predictions += 1
            self.queue.put((self.generation, (block.layer, e)))

    def _record(self, layer: int, x: torch.Tensor) -> None:
        block = next(b for b in self.blocks if b.layer == layer)
        ids = torch.topk(x[-1:] @ block.router.T, block.cfg.top_k).indices[0].tolist()
        self.freq[layer].update(ids)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                gen, key = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if gen < self.generation - 1:
                continue  # stale: that token has moved on
            self.cache.prefetch(key)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
