"""Online calibration of a predictor's probabilities: what it said vs what then happened.

Naive Bayes over correlated evidence (six experts per layer, two layers) is overconfident: on the
Qwen3-30B-A3B trace, experts it gave >= 0.9 were chosen 75% of the time and those it gave < 0.1
(almost all near 0.001) 2.8% (docs/BENCHMARKS.md, #17). A prefetch that weighs a probability
against what it would evict needs the frequency it will actually see, so the raw probability is
mapped to the frequency observed so far for raw values like it: histogram binning on a log2 scale
(raw probabilities span 1e-4..1, and the cheap decisions are made in the tail), kept online, with
one pseudo-observation at the raw value per bin (an empty bin returns the raw value unchanged).
Nothing is fitted offline: the bins start empty and fill with every routed layer.
"""
from __future__ import annotations

import numpy as np

EDGES = np.concatenate(([0.0], 2.0 ** np.arange(-12, 1)))  # [B] bin starts: 0, 2^-12 .. 1


class Reliability:
    """Per bin of raw probability: predictions made and how many came true."""

    def __init__(self):
        self.asked = np.zeros(len(EDGES))  # [B]
        self.came = np.zeros(len(EDGES))   # [B]

    @staticmethod
    def _bins(raw: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(EDGES, raw, side="right") - 1, 0, len(EDGES) - 1)

    def calibrated(self, raw: np.ndarray) -> np.ndarray:
        """[E] observed frequency so far for raw probabilities [E] like these."""
        b = self._bins(raw)
        return (self.came[b] + raw) / (self.asked[b] + 1.0)

    def record(self, raw: np.ndarray, chosen: np.ndarray) -> None:
        """raw [E] what was predicted, chosen [E] 1.0 where it came true."""
        b = self._bins(raw)
        np.add.at(self.asked, b, 1.0)
        np.add.at(self.came, b, chosen)
