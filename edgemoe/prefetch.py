"""Prefetcher: a background thread that loads the experts the next MoE layers will probably use.

When a layer has routed (its experts are about to run), the compute thread hands the layer's
MoE input and chosen experts to the prefetch thread and goes on. The thread asks a pluggable
predictor (`edgemoe.predictor`: none, next-layer router speculation, frequency prior, or a
learned ONNX model) which experts come next and loads them through `ExpertCache.prefetch`, which
never exceeds the budget and never evicts pinned experts or prefetches still waiting for their
layer; guesses their layer routed past unused go first (`Residency.room_for_prefetch`: one rule
for the engine, the budgeted llama.cpp mode and the replay). Prediction
(torch matmul, onnxruntime) and pread release the GIL, so they overlap with compute.
"""
from __future__ import annotations

import queue
import threading
import time

from edgemoe.expert_cache import ExpertCache
from edgemoe.moe import MoEBlock
from edgemoe.policies import Key
from edgemoe.predictor.base import Predictor, RouterPredictor, RoutingShape, RoutingState
from edgemoe.predictor.lookahead import RouterLookahead


class Prefetcher:
    def __init__(self, model, cache: ExpertCache, predictor: Predictor | None = None):
        self.blocks: list[MoEBlock] = list(model.moe_blocks)
        self.cache = cache
        self.predictor = predictor if predictor is not None else RouterPredictor(RoutingShape.of_blocks(self.blocks))
        self.index = {b.layer: i for i, b in enumerate(self.blocks)}
        shape = self.predictor.shape
        self.lookahead = (RouterLookahead(self.blocks, shape.n_experts if shape else None)
                          if self.predictor.needs_logits else None)
        self.state = RoutingState(len(self.blocks))  # touched by the prefetch thread only
        self._inputs: dict[int, object] = {}
        self.queue: queue.Queue = queue.Queue()
        self.generation = 0  # forward passes begun (compute thread)
        self.routed_at = (0, -1)  # (generation, MoE layer number) routed last (compute thread)
        self.predictions = 0
        self.error: Exception | None = None  # what stopped the thread, if anything did
        self._stop = threading.Event()
        for b in self.blocks:
            b.observers.append(self.observe)
            b.recorders.append(self.routed)
        self.thread = threading.Thread(target=self._run, name="edgemoe-prefetch", daemon=True)
        self.thread.start()

    def observe(self, layer: int, x) -> None:
        if self.lookahead is not None:
            self._inputs[layer] = x[-1].detach().clone()  # [D]: the newest token decides

    def routed(self, layer: int, ids) -> None:
        if self._stop.is_set():
            return  # closed, or stopped by a predictor error
        index = self.index[layer]
        if index == 0:
            self.generation += 1
        self.routed_at = (self.generation, index)
        self.queue.put((self.generation, index, ids.tolist(), self._inputs.pop(layer, None)))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._handle(*item)
            except Exception as exc:  # a predictor failure must never stop generation: stop prefetching
                self.error = exc
                self._stop.set()
            finally:
                self.queue.task_done()

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every routing handed over so far is handled (its prefetches done), while the
        thread runs and for at most timeout_s: tests."""
        deadline = time.monotonic() + timeout_s
        done = self.queue.all_tasks_done
        with done:
            while self.queue.unfinished_tasks and not self._stop.is_set() and time.monotonic() < deadline:
                done.wait(0.05)

    def _handle(self, gen: int, index: int, ids: list[list[int]], x_last) -> None:
        for key in self.predict_keys(index, ids, x_last, stale=gen < self.generation - 1):
            t = self.index[key[0]]
            if self.routed_at >= (gen + (t <= index), t):
                continue  # its layer has routed already: loaded now it would only wait for the next token
            self.predictions += 1
            self.cache.prefetch(key)

    def predict_keys(self, index: int, ids: list[list[int]], x_last, stale: bool = False) -> list[Key]:
        """Feed MoE layer number `index`'s routing (ids [T, k], MoE input of the newest token
        x_last [D]) and return the keys to offer the cache (`Predictor.candidates`), nearest and
        likeliest first. Calls must come in forward order; a stale call (its token has moved on)
        only updates the routing state."""
        logits = self.lookahead.rows(index, x_last).numpy() if x_last is not None and not stale else None
        query = self.state.update(index, ids, logits)
        self.predictor.observe(index, ids)
        if stale:
            return []
        n = len(self.blocks)
        # this token's later layers, then the next token's (its first layers after the last)
        return [(self.blocks[(index + a) % n].layer, e) for a, e, _ in self.predictor.candidates(query)
                if index + a < 2 * n]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for b in self.blocks:
            for hooks, hook in ((b.observers, self.observe), (b.recorders, self.routed)):
                if hook in hooks:
                    hooks.remove(hook)
