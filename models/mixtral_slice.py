"""A Mixtral-shaped slice for benchmarks: true Mixtral-8x7B dimensions (hidden 4096, expert ff
14336, 8 experts, top-2, 32 heads / 8 KV heads, vocab 32000) with a few layers and random
weights, written straight to GGUF — the real compute and I/O cost per token, in a file a
laptop can hold.

Quantizing 14336x4096 matrices takes seconds each, so one random matrix per role is quantized
and every expert is a distinct row permutation of its bytes (rows quantize independently, so
each is still a valid tensor of the same type and cost).

    python -m edgemoe.models.mixtral_slice OUT.gguf --layers 2 --type q4_k
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import PlannedTensor
from edgemoe.errors import InputError
from edgemoe.converters.convert import write_gguf
from edgemoe.converters.types import parse_output_type
from edgemoe.converters.vocab import write_vocab
from edgemoe.models import demo_dir
from edgemoe.native.quant import quantize

HIDDEN, FF, N_EXPERT, TOP_K, N_HEAD, N_KV, VOCAB = 4096, 14336, 8, 2, 32, 8, 32000
HEAD_DIM = HIDDEN // N_HEAD


class _RandomRows:
    """Quantized random [rows, cols] matrices, each a fresh row permutation of one base block."""

    def __init__(self, rng: np.random.Generator, qtype: QT, cols: int, base_rows: int, std: float = 0.02):
        self.rng, self.qtype = rng, qtype
        self.base = quantize(rng.standard_normal((base_rows, cols), dtype=np.float32) * std, qtype)

    def take(self, rows: int) -> np.ndarray:
        idx = self.rng.integers(0, self.base.shape[0], rows) if rows > self.base.shape[0] \
            else self.rng.permutation(self.base.shape[0])[:rows]
        return self.base[idx]


def _name(t: T, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[t].format(bid=layer) + ".weight"


def plan_slice(n_layers: int, qtype: QT, seed: int = 0) -> list[PlannedTensor]:
    rng = np.random.default_rng(seed)
    wide = _RandomRows(rng, qtype, HIDDEN, FF)    # rows of HIDDEN values: embeddings, q/k/v/o, gate, up
    tall = _RandomRows(rng, qtype, FF, HIDDEN)    # rows of FF values: down
    ones = lambda n: (lambda: np.ones(n, np.float32))  # noqa: E731
    plan = [PlannedTensor(_name(T.TOKEN_EMBD), (VOCAB, HIDDEN), [lambda: wide.take(VOCAB)], raw_qtype=qtype),
            PlannedTensor(_name(T.OUTPUT), (VOCAB, HIDDEN), [lambda: wide.take(VOCAB)], raw_qtype=qtype),
            PlannedTensor(_name(T.OUTPUT_NORM), (HIDDEN,), [ones(HIDDEN)], keep_f32=True)]
    for layer in range(n_layers):
        router = rng.standard_normal((N_EXPERT, HIDDEN), dtype=np.float32) * 0.5
        plan += [PlannedTensor(_name(T.ATTN_NORM, layer), (HIDDEN,), [ones(HIDDEN)], keep_f32=True),
                 PlannedTensor(_name(T.FFN_NORM, layer), (HIDDEN,), [ones(HIDDEN)], keep_f32=True),
                 PlannedTensor(_name(T.FFN_GATE_INP, layer), (N_EXPERT, HIDDEN), [lambda r=router: r], keep_f32=True)]
        for t, rows in ((T.ATTN_Q, HIDDEN), (T.ATTN_K, N_KV * HEAD_DIM), (T.ATTN_V, N_KV * HEAD_DIM), (T.ATTN_OUT, HIDDEN)):
            plan.append(PlannedTensor(_name(t, layer), (rows, HIDDEN), [lambda n=rows: wide.take(n)], raw_qtype=qtype))
        for t, src, shape in ((T.FFN_GATE_EXP, wide, (FF, HIDDEN)), (T.FFN_UP_EXP, wide, (FF, HIDDEN)),
                              (T.FFN_DOWN_EXP, tall, (HIDDEN, FF))):
            parts = [lambda s=src, n=shape[0]: s.take(n) for _ in range(N_EXPERT)]
            plan.append(PlannedTensor(_name(t, layer), (N_EXPERT, *shape), parts, raw_qtype=qtype,
                                      layer=layer, expert_tensor=True))
    return plan


def write_mixtral_slice(out: str | Path, n_layers: int = 2, out_type: str = "q4_k", seed: int = 0) -> Path:
    if not 1 <= n_layers <= 32:
        raise InputError(f"--layers must be 1..32, got {n_layers}")
    qtype, file_type = parse_output_type(out_type)
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(f"mixtral-slice-{n_layers}L")
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(TOP_K)
    w.add_vocab_size(VOCAB)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, demo_dir(), VOCAB)  # the demo's BPE, padded to Mixtral's vocab size
    write_gguf(w, plan_slice(n_layers, qtype, seed), qtype, Path(out))
    return Path(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--type", default="q4_k")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_mixtral_slice(a.output, a.layers, a.type, a.seed))


if __name__ == "__main__":
    main()
