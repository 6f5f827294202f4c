"""Quality metrics used everywhere (DESIGN.md): perplexity on held-out text, KL divergence of the
next-token distributions vs a reference model, top-1 agreement, next to the experts' bytes.

Models run through the edgemoe engine (`Engine.logits`) on non-overlapping windows of an
`EOS doc EOS doc ...` token stream (the demo model's training format): by default the demo
corpus's held-out split, cut as the demo's own report cuts it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_WINDOW = 256


def log_softmax(logits: np.ndarray) -> torch.Tensor:
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)


def nll_sum(logits: np.ndarray, tokens: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens[1:] under logits[:-1] ([T, V]), and the count."""
    lp = log_softmax(logits[:-1])
    target = torch.as_tensor(tokens[1:], dtype=torch.long)
    return float(-lp.gather(1, target[:, None]).sum()), len(tokens) - 1


def perplexity(logits: list[np.ndarray], windows: list[list[int]]) -> float:
    total, n = 0.0, 0
    for lg, w in zip(logits, windows):
        s, c = nll_sum(lg, w)
        total, n = total + s, n + c
    return math.exp(total / n) if n else float("nan")


def kl_divergence(logits: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
    """Per position KL(ref || model) in nats: how much the model's next-token distribution
    loses against the reference's. logits: [T, V] -> [T]."""
    p_log, q_log = log_softmax(ref_logits), log_softmax(logits)
    return (p_log.exp() * (p_log - q_log)).sum(-1).numpy()


def top1_agreement(logits: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
    """Per position 1.0 where the argmax tokens agree. [T, V] -> [T]."""
    return (np.asarray(logits).argmax(-1) == np.asarray(ref_logits).argmax(-1)).astype(np.float64)


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
            raise ValueError("no evaluation windows: the text is shorter than one window")
        ref_nll, n = 0.0, 0
        acc = [dict(nll=0.0, kl=0.0, top1=0.0) for _ in engines]
        for w in windows:
            ref_lg = ref.logits(w)
            s, c = nll_sum(ref_lg, w)
            ref_nll, n = ref_nll + s, n + c
            for a, engine in zip(acc, engines):
                lg = engine.logits(w)
                a["nll"] += nll_sum(lg, w)[0]
                a["kl"] += float(kl_divergence(lg[:-1], ref_lg[:-1]).sum())
                a["top1"] += float(top1_agreement(lg[:-1], ref_lg[:-1]).sum())
        return [QualityReport(str(m), expert_bytes_of(m), n, math.exp(a["nll"] / n), a["kl"] / n, a["top1"] / n,
                              math.exp(ref_nll / n)) for m, a in zip(models, acc)]
    finally:
        for engine in [ref, *engines]:
            engine.close()
