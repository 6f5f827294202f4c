"""A Qwen3-30B-A3B-shaped slice for benchmarks: the real model's dimensions (arch qwen3moe,
hidden 2048, 128 experts of ff 768, top-8, 32 query / 4 KV heads of dim 128, vocab 151936)
with a few layers of random Q4_K weights, written straight to GGUF. Many small experts (2.5 MiB
each at q4_k): per-read latency and queue depth rule its misses, as users of Qwen3-30B-A3B and
gpt-oss meet them.

Routing is not uniform: slice layer l takes the expert frequencies of real layer l*48/N of a
recorded Qwen3-30B-A3B run (models/qwen3_routing.json). qwen3moe has no router bias, so the
router rows carry the skew in their norms: row e is a random direction times sigma_e/sqrt(2048).
The router's input is RMS-normed (norm weights are ones), so whatever direction a hidden state
has, its logits are independent N(0, sigma_e^2) across experts, and sigma is fitted by Monte
Carlo so that top-8 selection frequencies match the real ones (scaled from top-6 to top-8,
capped at 0.45: a zero-mean logit is above the others at most about half the time). Tokens
then pick experts independently of each other only if their hidden states point different
ways, hence EMBED_STD and OUT_STD below.

    python -m edgemoe.models.qwen3_slice OUT.gguf --layers 16 --type q4_k
    python -m edgemoe.models.qwen3_slice OUT.gguf --layers 16 --mixed-bits 3.4375   # engine only

16 layers (the real model has 48) make a 5.6 GiB file: like the 8-layer Mixtral slice (6.2 GiB),
about twice a 3 GiB cap, so neither the file's page cache nor a full expert cache fits under it.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import PlannedTensor
from edgemoe.errors import InputError
from edgemoe.models.slices import (RandomRows, SliceShape, SliceSpec, expert_tensors, norm, rows, slice_main,
                                   tensor_name, write_slice)

HIDDEN, FF_EXPERT, N_EXPERT, TOP_K, N_HEAD, N_KV, HEAD_DIM, VOCAB = 2048, 768, 128, 8, 32, 4, 128, 151936
FF_DENSE = 6144          # the real config's intermediate_size, written as the hub converter does (no dense FFN)
REAL_LAYERS = 48
DEFAULT_LAYERS = 16
MAX_FREQUENCY = 0.45     # of tokens choosing one expert: the most a zero-mean logit gives
ROUTING_FILE = Path(__file__).with_name("qwen3_routing.json")
# Token embeddings large next to what each layer adds (attention output and expert down rows
# 0.005 instead of 0.02): hidden states keep token-specific directions through the layers, as the
# router fit assumes. With 0.02 everywhere, every token's hidden state converged to one direction
# after two layers and 100 of 128 experts went unused (measured on 256 tokens; docs/BENCHMARKS.md).
EMBED_STD, OUT_STD = 1.0, 0.005


def target_frequencies(n_layers: int) -> np.ndarray:
    """[n_layers, N_EXPERT] share of tokens choosing each expert at top-8, summing to 8 per layer:
    the recorded counts (+0.5, so no expert is never chosen), scaled to top-8 and capped."""
    recorded = json.loads(ROUTING_FILE.read_text())
    counts = np.asarray(recorded["counts"], np.float64)
    out = []
    for layer in range(n_layers):
        c = counts[layer * REAL_LAYERS // n_layers] + 0.5
        out.append(_cap(c / c.sum() * TOP_K, MAX_FREQUENCY))
    return np.stack(out)


def _cap(p: np.ndarray, cap: float) -> np.ndarray:
    """Clip at `cap` and hand the excess to the uncapped entries in proportion (same sum)."""
    p = p.copy()
    while (over := p > cap + 1e-12).any():
        excess = (p[over] - cap).sum()
        p[over] = cap
        free = p < cap
        p[free] += excess * p[free] / p[free].sum()
    return p


def router_sigmas(target: np.ndarray, rng: np.random.Generator, samples: int = 4096, iters: int = 200,
                  step: float = 0.25) -> np.ndarray:
    """Per-expert logit std whose top-k frequencies match `target` (damped fixed point on common
    random numbers; the best iterate is kept). Median 1: selection does not depend on scale."""
    z = rng.standard_normal((samples, target.size)).astype(np.float32)
    log_s, best_err, best = np.zeros(target.size), np.inf, np.zeros(target.size)
    for _ in range(iters):
        top = np.argpartition(-(z * np.exp(log_s).astype(np.float32)), TOP_K, axis=1)[:, :TOP_K]
        freq = np.bincount(top.ravel(), minlength=target.size) / samples
        err = np.abs(freq - target).max()
        if err < best_err:
            best_err, best = err, log_s.copy()
        log_s += step * (np.log(target) - np.log(np.maximum(freq, 0.5 / samples)))
        log_s = np.clip(log_s - np.median(log_s), -6.0, 6.0)
    return np.exp(best)


def plan_slice(n_layers: int, qtype: QT, seed: int = 0) -> list[PlannedTensor]:
    rng = np.random.default_rng(seed)
    wide = RandomRows(rng, qtype, HIDDEN, N_HEAD * HEAD_DIM)      # rows of 2048: q/k/v, gate, up, output
    embed = RandomRows(rng, qtype, HIDDEN, N_HEAD * HEAD_DIM, std=EMBED_STD)
    attn_out = RandomRows(rng, qtype, N_HEAD * HEAD_DIM, HIDDEN, std=OUT_STD)  # rows of 4096: attention output
    down = RandomRows(rng, qtype, FF_EXPERT, HIDDEN, std=OUT_STD)              # rows of 768: expert down
    targets = target_frequencies(n_layers)
    plan = [rows(T.TOKEN_EMBD, embed, (VOCAB, HIDDEN)), rows(T.OUTPUT, wide, (VOCAB, HIDDEN)),
            norm(T.OUTPUT_NORM, HIDDEN)]
    for layer in range(n_layers):
        sigma = router_sigmas(targets[layer], rng)
        # router: [N_EXPERT, HIDDEN] f32; logit_e = row_e . x with |x|^2 = HIDDEN -> N(0, sigma_e^2)
        router = (rng.standard_normal((N_EXPERT, HIDDEN)) * (sigma[:, None] / np.sqrt(HIDDEN))).astype(np.float32)
        plan += [norm(T.ATTN_NORM, HIDDEN, layer), norm(T.FFN_NORM, HIDDEN, layer),
                 norm(T.ATTN_Q_NORM, HEAD_DIM, layer), norm(T.ATTN_K_NORM, HEAD_DIM, layer),
                 PlannedTensor(tensor_name(T.FFN_GATE_INP, layer), (N_EXPERT, HIDDEN), [lambda r=router: r],
                               keep_f32=True),
                 rows(T.ATTN_Q, wide, (N_HEAD * HEAD_DIM, HIDDEN), layer),
                 rows(T.ATTN_K, wide, (N_KV * HEAD_DIM, HIDDEN), layer),
                 rows(T.ATTN_V, wide, (N_KV * HEAD_DIM, HIDDEN), layer),
                 rows(T.ATTN_OUT, attn_out, (HIDDEN, N_HEAD * HEAD_DIM), layer)]
        plan += expert_tensors(layer, N_EXPERT, [(T.FFN_GATE_EXP, wide, (FF_EXPERT, HIDDEN)),
                                                 (T.FFN_UP_EXP, wide, (FF_EXPERT, HIDDEN)),
                                                 (T.FFN_DOWN_EXP, down, (HIDDEN, FF_EXPERT))])
    return plan


def slice_spec(n_layers: int = DEFAULT_LAYERS, seed: int = 0) -> SliceSpec:
    if not 1 <= n_layers <= REAL_LAYERS:
        raise InputError(f"--layers must be 1..{REAL_LAYERS}, got {n_layers}")

    def extra(w: gguf.GGUFWriter) -> None:
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
        w.add_expert_feed_forward_length(FF_EXPERT)

    shape = SliceShape(n_layers, HIDDEN, FF_DENSE, N_HEAD, N_KV, N_EXPERT, TOP_K, VOCAB, rope_base=1e6, rms_eps=1e-6)
    return SliceSpec(gguf.MODEL_ARCH.QWEN3MOE, f"qwen3-30b-a3b-slice-{n_layers}L", shape,
                     lambda qtype: plan_slice(n_layers, qtype, seed), extra)


def write_qwen3_slice(out: str | Path, n_layers: int = DEFAULT_LAYERS, out_type: str = "q4_k", seed: int = 0) -> Path:
    return write_slice(out, slice_spec(n_layers, seed), out_type)


def main() -> None:
    slice_main(slice_spec, __doc__, DEFAULT_LAYERS)


if __name__ == "__main__":
    main()
