"""Quality metrics used everywhere (DESIGN.md): perplexity on held-out text, KL divergence of the
next-token distributions vs a reference model, top-1 agreement, next to the experts' bytes.

Models run through the edgemoe engine (`Engine.logits`) on non-overlapping windows of an
`EOS doc EOS doc ...` token stream (the demo model's training format): by default the demo
corpus's held-out split, cut as the demo's own report cuts it. `QualitySums` is the one
implementation of the metrics and of which positions they average over; the compression
pipeline, its LoRA stage and the pruning study use it too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgemoe.errors import InputError

DEFAULT_WINDOW = 256


def log_probs(logits) -> torch.Tensor:
    """float64 log-softmax over the vocabulary of logits [T, V] (numpy or torch; log-probabilities
    pass through unchanged)."""
    return torch.log_softmax(torch.as_tensor(logits).detach().to(torch.float64), dim=-1)


def kl_rows(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per position KL(reference || model) in nats from log-probabilities [T, V] -> [T]: how much the
    model's next-token distribution loses against the reference's. Differentiable (LoRA's loss)."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


@dataclass
class QualitySums:
    """Perplexity, KL and top-1 agreement of a model against a reference, summed window by window.

    The averaging convention, the same for every caller (`edgemoe eval`, `compress --eval`, the
    LoRA record, the pruning study, the dual-precision bench): a window of T tokens contributes its
    T - 1 predicted positions, rows 0..T-2 of its logits, the ones whose next token is known.
    Perplexity, KL and top-1 are all means over those same positions, so they describe one set of
    predictions; a window's last row (no next token) is not counted."""
    nll: float = 0.0            # next-token negative log-likelihood of the model, summed
    reference_nll: float = 0.0  # the same for the reference
    kl: float = 0.0             # KL(reference || model), nats, summed over positions
    top1: float = 0.0           # positions whose argmax agrees with the reference's
    positions: int = 0

    def add(self, tokens, logits, ref_logits) -> None:
        """One window: tokens [T] and the logits (or log-probabilities) [T, V] of model and reference."""
        target = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[1:, None]
        if not len(target):
            return
        lp, ref = log_probs(logits[:-1]), log_probs(ref_logits[:-1])
        self.nll -= float(lp.gather(1, target).sum())
        self.reference_nll -= float(ref.gather(1, target).sum())
        self.kl += float(kl_rows(ref, lp).sum())
        self.top1 += float((lp.argmax(-1) == ref.argmax(-1)).sum())
        self.positions += len(target)

    @classmethod
    def of_window(cls, tokens, logits, ref_logits) -> "QualitySums":
        sums = cls()
        sums.add(tokens, logits, ref_logits)
        return sums

    def _mean(self, total: float) -> float:
        return total / self.positions if self.positions else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self._mean(self.nll))

    @property
    def reference_perplexity(self) -> float:
        return math.exp(self._mean(self.reference_nll))

    @property
    def mean_kl(self) -> float:
        """nats per predicted position"""
        return self._mean(self.kl)

    @property
    def top1_share(self) -> float:
        return self._mean(self.top1)

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "perplexity_original": self.reference_perplexity,
                "kl": self.mean_kl, "top1": self.top1_share, "positions": self.positions}


def token_windows(tokenizer, documents: list[str], window: int = DEFAULT_WINDOW,
                  max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping `window`-token windows of the EOS-separated stream, tail dropped."""
    stream: list[int] = []
    for doc in documents:
        stream.append(tokenizer.eos)
        stream.extend(tokenizer.encode(doc, add_bos=False))
    n = len(stream) // window
    if max_windows is not None:
        n = min(n, max_windows)
    return [stream[i * window:(i + 1) * window] for i in range(n)]


def heldout_windows(tokenizer, window: int = DEFAULT_WINDOW, max_windows: int | None = None) -> list[list[int]]:
    from edgemoe.models.corpus import load_corpus

    return token_windows(tokenizer, load_corpus().heldout, window, max_windows)


def teacher_forced_logits(engine, tokens: list[int]) -> tuple[np.ndarray, list]:
    """Logits [T, V] of `tokens` fed one per forward pass through the KV cache, as decoding runs
    (so cache misses and dual precision act per token), and each step's CacheStats."""
    kv = engine.model.new_kv(len(tokens))
    engine.cache.step_stats()  # start the counters at this call
    rows, stats = [], []
    with torch.no_grad():
        for pos, token in enumerate(tokens):
            rows.append(engine.model.forward([token], kv, pos)[-1].numpy())
            stats.append(engine.cache.step_stats())
    return np.stack(rows), stats


@dataclass(frozen=True)
class QualityReport:
    path: str
    expert_bytes: int       # bytes of all expert tensors in the file
    n_tokens: int           # predicted positions
    perplexity: float
    kl: float               # mean KL(reference || model), nats per token
    top1: float             # share of positions whose argmax matches the reference's
    reference_perplexity: float


def expert_bytes_of(path: str | Path) -> int:
    from edgemoe.gguf_file import GGUFFile

    return sum(t.nbytes for t in GGUFFile(path).tensors.values() if t.is_expert)


def evaluate(models: list[str | Path], reference: str | Path, windows: list[list[int]] | None = None,
             max_windows: int | None = None, engine_config=None) -> list[QualityReport]:
    """Each model against `reference` on the same windows (default: the held-out demo corpus,
    tokenized by the reference). All engines stay open while the windows stream, so no logits
    are kept beyond one window."""
    from edgemoe.engine import Engine, EngineConfig

    ref = Engine(reference)
    engines = [Engine(m, engine_config or EngineConfig()) for m in models]
    try:
        if windows is None:
            windows = heldout_windows(ref.tokenizer, max_windows=max_windows)
        if not windows:
            raise InputError("no evaluation windows: the text is shorter than one window")
        sums = [QualitySums() for _ in engines]
        for w in windows:
            ref_lg = ref.logits(w)
            for q, engine in zip(sums, engines):
                q.add(w, engine.logits(w), ref_lg)
        return [QualityReport(str(m), expert_bytes_of(m), q.positions, q.perplexity, q.mean_kl, q.top1_share,
                              q.reference_perplexity) for m, q in zip(models, sums)]
    finally:
        for engine in [ref, *engines]:
            engine.close()
