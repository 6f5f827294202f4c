"""A Mixtral-shaped slice for benchmarks: true Mixtral-8x7B dimensions (hidden 4096, expert ff
14336, 8 experts, top-2, 32 heads / 8 KV heads, vocab 32000) with a few layers and random
weights, written straight to GGUF — the real compute and I/O cost per token, in a file a
laptop can hold.

Random rows as every slice makes them (edgemoe/models/slices.py): one quantized block per row
length, every tensor a fresh row permutation of its bytes.

    python -m edgemoe.models.mixtral_slice OUT.gguf --layers 2 --type q4_k
    python -m edgemoe.models.mixtral_slice OUT.gguf --layers 8 --mixed-bits 3.4375   # engine only
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import PlannedTensor
from edgemoe.errors import InputError
from edgemoe.models.slices import (RandomRows, SliceShape, SliceSpec, expert_tensors, norm, rows, slice_main,
                                   tensor_name, write_slice)

HIDDEN, FF, N_EXPERT, TOP_K, N_HEAD, N_KV, VOCAB = 4096, 14336, 8, 2, 32, 8, 32000
MIXTRAL = SliceShape(2, HIDDEN, FF, N_HEAD, N_KV, N_EXPERT, TOP_K, VOCAB, rope_base=1e6, rms_eps=1e-5)


def plan_slice(shape: SliceShape, qtype: QT, seed: int = 0) -> list[PlannedTensor]:
    rng = np.random.default_rng(seed)
    d, ff, n_expert, kv_rows = shape.hidden, shape.ff, shape.n_expert, shape.n_kv * (shape.hidden // shape.n_head)
    wide = RandomRows(rng, qtype, d, ff)    # rows of d values: embeddings, q/k/v/o, gate, up
    tall = RandomRows(rng, qtype, ff, d)    # rows of ff values: down
    plan = [rows(T.TOKEN_EMBD, wide, (shape.vocab, d)), rows(T.OUTPUT, wide, (shape.vocab, d)),
            norm(T.OUTPUT_NORM, d)]
    for layer in range(shape.n_layers):
        router = rng.standard_normal((n_expert, d), dtype=np.float32) * 0.5
        plan += [norm(T.ATTN_NORM, d, layer), norm(T.FFN_NORM, d, layer),
                 PlannedTensor(tensor_name(T.FFN_GATE_INP, layer), (n_expert, d), [lambda r=router: r],
                               keep_f32=True)]
        plan += [rows(t, wide, (n, d), layer) for t, n in
                 ((T.ATTN_Q, d), (T.ATTN_K, kv_rows), (T.ATTN_V, kv_rows), (T.ATTN_OUT, d))]
        plan += expert_tensors(layer, n_expert, [(T.FFN_GATE_EXP, wide, (ff, d)), (T.FFN_UP_EXP, wide, (ff, d)),
                                                 (T.FFN_DOWN_EXP, tall, (d, ff))])
    return plan


def slice_spec(n_layers: int = 2, seed: int = 0, dims: SliceShape = MIXTRAL) -> SliceSpec:
    """dims: Mixtral's by default; tests pass smaller ones (the same code at a size that runs in seconds)."""
    if not 1 <= n_layers <= 32:
        raise InputError(f"--layers must be 1..32, got {n_layers}")
    shape = replace(dims, n_layers=n_layers)
    return SliceSpec(gguf.MODEL_ARCH.LLAMA, f"mixtral-slice-{n_layers}L", shape,
                     lambda qtype: plan_slice(shape, qtype, seed),
                     lambda w: w.add_rope_dimension_count(shape.hidden // shape.n_head))


def write_mixtral_slice(out: str | Path, n_layers: int = 2, out_type: str = "q4_k", seed: int = 0) -> Path:
    return write_slice(out, slice_spec(n_layers, seed), out_type)


def main() -> None:
    slice_main(slice_spec, __doc__, 2)


if __name__ == "__main__":
    main()
