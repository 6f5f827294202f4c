"""A Mixtral-shaped slice for benchmarks: true Mixtral-8x7B dimensions (hidden 4096, expert ff
14336, 8 experts, top-2, 32 heads / 8 KV heads, vocab 32000) with a few layers and random
weights, written straight to GGUF — the real compute and I/O cost per token, in a file a
laptop can hold.

Random rows as every slice makes them (edgemoe/models/slices.py): one quantized block per row
length, every tensor a fresh row permutation of its bytes.

    python -m edgemoe.models.mixtral_slice OUT.gguf --layers 2 --type q4_k
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import PlannedTensor
from edgemoe.errors import InputError
from edgemoe.models.slices import RandomRows, SliceShape, expert_tensors, norm, rows, tensor_name, slice_main, write_slice

HIDDEN, FF, N_EXPERT, TOP_K, N_HEAD, N_KV, VOCAB = 4096, 14336, 8, 2, 32, 8, 32000
HEAD_DIM = HIDDEN // N_HEAD


def plan_slice(n_layers: int, qtype: QT, seed: int = 0) -> list[PlannedTensor]:
    rng = np.random.default_rng(seed)
    wide = RandomRows(rng, qtype, HIDDEN, FF)    # rows of HIDDEN values: embeddings, q/k/v/o, gate, up
    tall = RandomRows(rng, qtype, FF, HIDDEN)    # rows of FF values: down
    plan = [rows(T.TOKEN_EMBD, wide, (VOCAB, HIDDEN)), rows(T.OUTPUT, wide, (VOCAB, HIDDEN)),
            norm(T.OUTPUT_NORM, HIDDEN)]
    for layer in range(n_layers):
        router = rng.standard_normal((N_EXPERT, HIDDEN), dtype=np.float32) * 0.5
        plan += [norm(T.ATTN_NORM, HIDDEN, layer), norm(T.FFN_NORM, HIDDEN, layer),
                 PlannedTensor(tensor_name(T.FFN_GATE_INP, layer), (N_EXPERT, HIDDEN), [lambda r=router: r],
                               keep_f32=True)]
        plan += [rows(t, wide, (n, HIDDEN), layer) for t, n in
                 ((T.ATTN_Q, HIDDEN), (T.ATTN_K, N_KV * HEAD_DIM), (T.ATTN_V, N_KV * HEAD_DIM), (T.ATTN_OUT, HIDDEN))]
        plan += expert_tensors(layer, N_EXPERT, [(T.FFN_GATE_EXP, wide, (FF, HIDDEN)), (T.FFN_UP_EXP, wide, (FF, HIDDEN)),
                                                 (T.FFN_DOWN_EXP, tall, (HIDDEN, FF))])
    return plan


def write_mixtral_slice(out: str | Path, n_layers: int = 2, out_type: str = "q4_k", seed: int = 0) -> Path:
    if not 1 <= n_layers <= 32:
        raise InputError(f"--layers must be 1..32, got {n_layers}")

    shape = SliceShape(n_layers, HIDDEN, FF, N_HEAD, N_KV, N_EXPERT, TOP_K, VOCAB, rope_base=1e6, rms_eps=1e-5)
    return write_slice(out, gguf.MODEL_ARCH.LLAMA, f"mixtral-slice-{n_layers}L", out_type, shape,
                       lambda qtype: plan_slice(n_layers, qtype, seed),
                       extra=lambda w: w.add_rope_dimension_count(HEAD_DIM))


def main() -> None:
    slice_main(write_mixtral_slice, __doc__, 2)


if __name__ == "__main__":
    main()
