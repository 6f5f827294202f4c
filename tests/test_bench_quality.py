"""The one implementation of the quality metrics (edgemoe.bench.quality.QualitySums) against
torch's own cross-entropy and KL, and its averaging convention: the predicted positions only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgemoe.bench.quality import QualitySums


def test_sums_match_torch_over_the_predicted_positions():
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 50, (n,), generator=gen) for n in (7, 12, 1)]  # a 1-token window predicts nothing
    logits = [torch.randn(len(w), 50, generator=gen, dtype=torch.float64) for w in windows]
    ref = [x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in logits]
    sums = QualitySums()
    for w, lg, r in zip(windows, logits, ref):
        sums.add(w.tolist(), lg.numpy().astype(np.float32) if len(w) == 7 else lg, r)  # numpy or torch
    rows = [(w[1:], lg[:-1], r[:-1]) for w, lg, r in zip(windows, logits, ref)]  # predicted positions
    target = torch.cat([t for t, _, _ in rows])
    lg, r = torch.cat([x for _, x, _ in rows]), torch.cat([x for _, _, x in rows])
    assert sums.positions == len(target) == 6 + 11
    assert sums.perplexity == pytest.approx(math.exp(F.cross_entropy(lg, target).item()), rel=1e-6)
    assert sums.reference_perplexity == pytest.approx(math.exp(F.cross_entropy(r, target).item()), rel=1e-6)
    want_kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(r, -1), log_target=True, reduction="sum") / len(target)
    assert sums.mean_kl == pytest.approx(want_kl.item(), rel=1e-6)
    assert sums.top1_share == pytest.approx((lg.argmax(-1) == r.argmax(-1)).double().mean().item())
    assert sums.as_dict()["positions"] == 17


def test_a_window_against_itself_and_log_probabilities_as_input():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (9,), generator=gen)
    logits = torch.randn(9, 20, generator=gen)
    same = QualitySums.of_window(tokens, logits, torch.log_softmax(logits, -1))  # log-probs pass unchanged
    assert same.mean_kl == pytest.approx(0.0, abs=1e-7) and same.top1_share == 1.0  # (float32 log-probs)
    assert same.perplexity == pytest.approx(same.reference_perplexity, rel=1e-6)
    assert math.isnan(QualitySums().mean_kl)
