"""The learned predictor's input: one vector per query, built the same way from a live engine
and from a recorded trace.

Layout (L MoE layers, E experts, R = 1 + AHEAD look-ahead rows):
  [L]      one-hot of the query's layer
  [L*E]    this token's chosen experts at layers 0..index (multi-hot; zeros beyond)
  [L*E]    the previous token's chosen experts at every layer (zeros in a prefill)
  [R*E]    softmax of the router look-ahead rows (zeros past the last layer, or when unused)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.predictor.base import Query
from edgemoe.predictor.lookahead import AHEAD


@dataclass(frozen=True)
class FeatureSpec:
    n_layers: int
    n_experts: int
    use_logits: bool = True
    rows: int = 1 + AHEAD

    @property
    def size(self) -> int:
        return self.n_layers + 2 * self.n_layers * self.n_experts + self.rows * self.n_experts

    def encode(self, q: Query, out: np.ndarray | None = None) -> np.ndarray:
        """The feature vector of `q` (written into `out`, which must be zeros, if given)."""
        L, E = self.n_layers, self.n_experts
        v = np.zeros(self.size, np.float32) if out is None else out
        # index lists in Python, one scatter: this runs per layer in the prefetch thread
        hot = [q.index]
        hot += [L + i * E + e for i, ids in enumerate(q.cur[: q.index + 1]) for e in ids]
        if q.prev is not None:
            hot += [L + (L + i) * E + e for i, ids in enumerate(q.prev) for e in ids]
        v[hot] = 1.0
        base = L + 2 * L * E
        if self.use_logits and q.logits is not None:
            rows = np.asarray(q.logits[: self.rows], np.float32)
            z = np.exp(rows - rows.max(axis=1, keepdims=True))
            v[base: base + rows.size] = (z / z.sum(axis=1, keepdims=True)).ravel()
        return v
