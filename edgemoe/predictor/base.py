"""Routing predictors for the prefetcher: what is known at prefetch time (`Query`), and the
predictors that need no trained file: none, frequency prior, next-layer router speculation.

A prediction is a list of (ahead, expert): `ahead` MoE layers after the query's layer, wrapping
to the next token's first layers past the last one. The engine's prefetcher and the trace
replay (`edgemoe.predictor.replay`) build the same queries, so a predictor behaves identically
in `edgemoe simulate` and in generation.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import InputError

Prediction = list[tuple[int, int]]  # (ahead, expert)
Candidates = list[tuple[int, int, float | None]]  # (ahead, expert, probability it is chosen; None: not known)


class PredictorError(InputError):
    """A predictor file that is missing, corrupt, or made for another model."""


@dataclass(frozen=True)
class RoutingShape:
    """What a predictor must agree on with the model it serves."""
    model: str
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int

    @property
    def n_layers(self) -> int:
        return len(self.moe_layers)

    @classmethod
    def of_trace(cls, trace) -> "RoutingShape":
        return cls(trace.model, tuple(trace.moe_layers), trace.n_experts, trace.top_k)

    @classmethod
    def of_engine(cls, engine) -> "RoutingShape":
        """As `TraceRecorder` describes the engine's traces (so trained files match)."""
        f = engine.file
        return cls(engine.path.name, tuple(b.layer for b in engine.model.moe_blocks),
                   int(f.arch_field("expert_count")), int(f.arch_field("expert_used_count")))

    @classmethod
    def of_blocks(cls, blocks, model: str = "") -> "RoutingShape":
        """From a model's MoE blocks (router [E, D], RouterConfig.top_k)."""
        # pruned layers have fewer router rows: the widest layer sets the width (narrower ones are padded)
        return cls(model, tuple(b.layer for b in blocks), max(int(b.router.shape[0]) for b in blocks),
                   int(blocks[0].cfg.top_k))


@dataclass(frozen=True)
class Query:
    """The prefetch point: MoE layer number `index` (0-based among MoE layers) of the newest
    token has routed; its experts are about to run."""
    index: int
    cur: tuple[tuple[int, ...] | None, ...]         # this token's experts per MoE layer, None after index
    prev: tuple[tuple[int, ...], ...] | None        # previous token's experts (None in a prompt's prefill)
    logits: np.ndarray | None                       # [R, E] router look-ahead rows, None if not recorded


class RoutingState:
    """Routing so far of the newest token and of the one before, fed layer by layer."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.cur: list[tuple[int, ...] | None] = [None] * n_layers
        self.prev: tuple[tuple[int, ...], ...] | None = None

    def update(self, index: int, ids: list[list[int]], logits: np.ndarray | None) -> Query:
        """ids: [T, k] experts of the step's tokens at MoE layer `index`; the query is about
        the last token. A multi-token step is a prompt's prefill: no previous token is known."""
        if index == 0:
            complete = all(c is not None for c in self.cur)
            self.prev = tuple(self.cur) if complete and len(ids) == 1 else None
            self.cur = [None] * self.n_layers
        self.cur[index] = tuple(ids[-1])
        return Query(index, tuple(self.cur), self.prev, logits)


class Predictor:
    name = "none"
    needs_logits = False  # the query must carry router look-ahead rows
    shape: RoutingShape | None = None  # the model it predicts for (look-ahead rows are n_experts wide)

    def observe(self, index: int, ids: list[list[int]]) -> None:
        """Layer `index` routed the step's tokens to ids [T, k] (online statistics)."""

    def predict(self, q: Query) -> Prediction:
        return []

    def candidates(self, q: Query) -> Candidates:
        """What the prefetcher offers the cache, likeliest first: the prediction, with the
        probability that the target layer chooses each expert where the predictor knows it."""
        return [(a, e, None) for a, e in self.predict(q)]


class FrequencyPrior:
    """Per MoE layer, how often each expert was chosen so far (the newest token of each step)."""

    def __init__(self, n_layers: int):
        self.counts = [Counter() for _ in range(n_layers)]

    def observe(self, index: int, ids: list[list[int]]) -> None:
        self.counts[index].update(ids[-1])

    def top(self, index: int, n: int, exclude: tuple[int, ...] = ()) -> list[int]:
        return [e for e, _ in self.counts[index].most_common() if e not in exclude][:n]


class PriorPredictor(Predictor):
    """The next MoE layer's most frequent experts so far (the next token's first layer after
    the last)."""
    name = "prior"

    def __init__(self, shape: RoutingShape):
        self.shape, self.prior = shape, FrequencyPrior(shape.n_layers)

    def observe(self, index, ids):
        self.prior.observe(index, ids)

    def predict(self, q):
        target = (q.index + 1) % self.shape.n_layers
        return [(1, e) for e in self.prior.top(target, self.shape.top_k)]


class RouterPredictor(PriorPredictor):
    """Next-layer router speculation: layer l+1's router on layer l's MoE input, top-k, plus
    `extra_from_prior` frequent experts; the next token's first layer from the prior (its
    hidden state does not exist yet). The default prefetch predictor."""
    name = "router"
    needs_logits = True

    def __init__(self, shape: RoutingShape, extra_from_prior: int = 0):
        super().__init__(shape)
        self.extra_from_prior = extra_from_prior

    def predict(self, q):
        if q.index + 1 >= self.shape.n_layers:
            return super().predict(q)
        if q.logits is None or len(q.logits) < 2:
            return []
        chosen = tuple(int(e) for e in np.argsort(-q.logits[1], kind="stable")[: self.shape.top_k])
        extra = self.prior.top(q.index + 1, self.extra_from_prior, exclude=chosen)
        return [(1, e) for e in chosen + tuple(extra)]


PREDICTORS = ("none", "router", "prior", "cooccur", "learned")
DEFAULT_PREDICTOR = "cooccur"  # needs no file and no router logits; measured in docs/BENCHMARKS.md


def make_predictor(name: str, shape: RoutingShape, source=None) -> Predictor:
    """name: none | router | prior | cooccur | learned (source: an .onnx path or its bytes); "learned@N"
    uses only the first N of the layers ahead the file predicts."""
    if name == "none":
        return Predictor()
    if name == "router":
        return RouterPredictor(shape)
    if name == "prior":
        return PriorPredictor(shape)
    if name == "cooccur":
        from edgemoe.predictor.cooccur import CooccurPredictor

        return CooccurPredictor(shape)
    if name == "learned" or name.startswith("learned@") and name[8:].isdigit():
        from edgemoe.predictor.onnx_runtime import LearnedPredictor

        if source is None:
            raise PredictorError("the learned predictor needs a file: pass --predictor PATH.onnx "
                                 "(train one with `edgemoe predictor train`)")
        return LearnedPredictor(source, shape, int(name[8:]) if "@" in name else None)
    raise PredictorError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)} or give an .onnx file")
