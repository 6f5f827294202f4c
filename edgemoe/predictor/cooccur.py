"""Cross-layer co-occurrence predictor: the next MoE layer's experts from which experts this token
chose in the layers just before, counted online. Needs no trained file and no router logits, so it
runs the same in the engine, in the budgeted llama.cpp mode and on any recorded trace.

Real routing is correlated across consecutive layers (the residual stream changes little from one
layer to the next): on Qwen3-30B-A3B's trace, layer l's six experts predict layer l+1's about 1.7x
better than the frequency prior does (docs/BENCHMARKS.md). The score of expert e' at the target
layer j is naive Bayes over the evidence layers i (this token's two layers before j; past the last
layer, the previous token's last two layers):

    log P_j(e') + sum_i sum_{e in S_i} log( P(e in S_i | e' in S_j) / P(e in S_i) )

with counts smoothed by one pseudo-observation spread as the prior (the estimate of a pair never
seen is the prior itself, not zero). Counts start at zero and grow with every routed token,
prompt prefills included (each of their tokens is one observation).

The score is log P(e' chosen | evidence) up to a constant, so top_k * softmax(score) is the naive
Bayes probability that the target layer chooses e' (its k experts' probabilities sum to k). It is
overconfident, so it is calibrated online against what the target layer then chose
(`edgemoe.predictor.calibration`). The cache is offered this layer's top-k and, beyond them,
every expert whose calibrated probability beats the base rate top_k / n_experts (what an expert
of the layer is chosen with, knowing nothing). A wrong guess is cheap in misses because the cache
evicts it first once its layer has routed (`Residency`); what it costs is the read.
"""
from __future__ import annotations

import numpy as np

from edgemoe.predictor.base import Candidates, Prediction, Predictor, Query, RoutingShape
from edgemoe.predictor.calibration import Reliability

OFFSETS = (1, 2)  # evidence: the layers 1 and 2 before the target


class CooccurPredictor(Predictor):
    name = "cooccur"

    def __init__(self, shape: RoutingShape):
        self.shape = shape
        L, E = shape.n_layers, shape.n_experts
        self.freq = np.zeros((L, E), np.float32)          # [L, E] tokens that chose e at layer i
        self.tokens = np.zeros(L, np.float32)             # [L] tokens observed at layer i
        # pairs[d][i][e, e']: tokens with e at layer i and e' at layer i + d (past the last layer:
        # the next token's layer i + d - L)
        self.pairs = {d: np.zeros((L, E, E), np.float32) for d in OFFSETS}
        self.step: list[list[list[int]] | None] = [None] * L    # this step's rows per layer
        self.prev_last: list[list[int] | None] = [None] * L     # the previous step's last token
        self.reliability = Reliability()
        self.asked: dict[int, np.ndarray] = {}  # per target layer: the raw [E] probabilities last predicted

    def observe(self, index: int, ids: list[list[int]]) -> None:
        """ids [T, k] at MoE layer `index`; rows of layers with fewer tokens are aligned from the
        end (llama.cpp computes only the last token in the last layer)."""
        L = self.shape.n_layers
        if index == 0:
            self.prev_last = [rows[-1] if rows else None for rows in self.step]
            self.step = [None] * L
        raw = self.asked.pop(index, None)
        if raw is not None:  # what was predicted for this layer's newest token, against what it chose
            chosen = np.zeros(len(raw))
            chosen[list(ids[-1])] = 1.0
            self.reliability.record(raw, chosen)
        for row in ids:
            self.freq[index, row] += 1
        self.tokens[index] += len(ids)
        self.step[index] = ids
        for d in OFFSETS:
            src = index - d
            if src >= 0 and self.step[src] is not None:
                self._count(self.pairs[d][src], self.step[src], ids)
            elif src < 0 and self.prev_last[src] is not None and len(ids) == 1:  # the previous token's layer
                self._count(self.pairs[d][src % L], [self.prev_last[src]], ids)

    @staticmethod
    def _count(table: np.ndarray, src_rows: list[list[int]], ids: list[list[int]]) -> None:
        for a, b in zip(src_rows[::-1], ids[::-1]):  # the same token, from the newest back
            table[np.ix_(a, b)] += 1

    def scores(self, target: int, evidence: list[tuple[int, int, list[int]]]) -> np.ndarray:
        """[E] log-score of each expert at layer `target`; evidence: (offset d, layer i, experts)."""
        E = self.shape.n_experts
        prior = (self.freq[target] + 1.0) / (self.tokens[target] + E)
        score = np.log(prior)
        for d, i, experts in evidence:
            p_e = (self.freq[i, experts] + 1.0) / (self.tokens[i] + E)                 # [k]
            cond = (self.pairs[d][i][experts] + p_e[:, None]) / (self.freq[target][None, :] + 1.0)  # [k, E]
            score += np.log(cond / p_e[:, None]).sum(axis=0)
        return score

    def _ranked(self, q: Query) -> tuple[np.ndarray, np.ndarray] | None:
        """(experts by score, best first [E], calibrated probabilities [E]) at the next layer, or
        None when nothing is known yet (a prompt's first token past the last layer)."""
        L, k = self.shape.n_layers, self.shape.top_k
        target = (q.index + 1) % L
        evidence = []
        for d in OFFSETS:
            src = q.index + 1 - d
            experts = q.cur[src] if src >= 0 else (q.prev[src] if q.prev is not None else None)
            if experts is not None:
                evidence.append((d, src % L, list(experts)))
        if target == 0 and q.prev is None and len(evidence) == 0:
            return None
        score = self.scores(target, evidence)
        odds = np.exp(score - score.max())
        raw = np.minimum(k * odds / odds.sum(), 1.0)
        self.asked[target] = raw
        return np.argsort(-score, kind="stable"), self.reliability.calibrated(raw)

    def predict(self, q: Query) -> Prediction:
        ranked = self._ranked(q)
        return [] if ranked is None else [(1, int(e)) for e in ranked[0][: self.shape.top_k]]

    def candidates(self, q: Query) -> Candidates:
        ranked = self._ranked(q)
        if ranked is None:
            return []
        order, p = ranked
        k, base = self.shape.top_k, self.shape.top_k / self.shape.n_experts
        extra = sorted((e for e in order[k:] if p[e] > base), key=lambda e: -p[e])
        return [(1, int(e), float(p[e])) for e in list(order[:k]) + extra]
