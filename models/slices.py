"""What the benchmark slices share: quantized random rows, tensor names, the expert tensors of a
layer and the writer. A slice has a real model's true dimensions and a few layers of random
weights, written straight to GGUF in llama.cpp's stock layout: the real compute and I/O cost
per token, in a file a laptop can hold.

Quantizing full-size matrices takes seconds each, so one random block per row length is
quantized and every tensor is a fresh row permutation of its bytes (rows quantize
independently, so each is still a valid tensor of the same type and cost).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import PlannedTensor
from edgemoe.converters.convert import write_gguf
from edgemoe.converters.types import parse_output_type
from edgemoe.converters.vocab import write_vocab
from edgemoe.models import demo_dir
from edgemoe.native.quant import quantize


class RandomRows:
    """Quantized random [rows, cols] matrices, each a fresh row permutation of one base block."""

    def __init__(self, rng: np.random.Generator, qtype: QT, cols: int, base_rows: int, std: float = 0.02):
        self.rng, self.qtype = rng, qtype
        self.base = quantize(rng.standard_normal((base_rows, cols), dtype=np.float32) * std, qtype)

    def take(self, rows: int) -> np.ndarray:
        idx = self.rng.integers(0, self.base.shape[0], rows) if rows > self.base.shape[0] \
            else self.rng.permutation(self.base.shape[0])[:rows]
        return self.base[idx]


def tensor_name(t: T, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[t].format(bid=layer) + ".weight"


def ones(n: int) -> Callable[[], np.ndarray]:
    return lambda: np.ones(n, np.float32)


def norm(t: T, n: int, layer: int | None = None) -> PlannedTensor:
    return PlannedTensor(tensor_name(t, layer), (n,), [ones(n)], keep_f32=True)


def rows(t: T, src: RandomRows, shape: tuple[int, int], layer: int | None = None) -> PlannedTensor:
    """A dense 2-D tensor [rows, cols] of quantized random rows."""
    return PlannedTensor(tensor_name(t, layer), shape, [lambda: src.take(shape[0])], raw_qtype=src.qtype)


def expert_tensors(layer: int, n_expert: int, roles: list[tuple[T, RandomRows, tuple[int, int]]]) -> list[PlannedTensor]:
    """The layer's 3-D expert tensors [n_expert, rows, cols], one fresh permutation per expert."""
    out = []
    for t, src, shape in roles:
        parts = [lambda s=src, n=shape[0]: s.take(n) for _ in range(n_expert)]
        out.append(PlannedTensor(tensor_name(t, layer), (n_expert, *shape), parts, raw_qtype=src.qtype,
                                 layer=layer, expert_tensor=True))
    return out


@dataclass(frozen=True)
class SliceShape:
    """The hyperparameters every slice writes (llama.cpp's key names in comments)."""
    n_layers: int       # block_count
    hidden: int         # embedding_length
    ff: int             # feed_forward_length
    n_head: int
    n_kv: int
    n_expert: int
    top_k: int          # expert_used_count
    vocab: int
    rope_base: float
    rms_eps: float
    context: int = 4096


def write_slice(out: str | Path, arch: gguf.MODEL_ARCH, name: str, out_type: str, shape: SliceShape,
                plan: Callable[[QT], list[PlannedTensor]],
                extra: Callable[[gguf.GGUFWriter], None] = lambda w: None) -> Path:
    """Metadata (`extra` adds what only this architecture has), the demo's BPE padded to the
    vocab size, then the tensors of `plan(qtype)`, written atomically."""
    qtype, file_type = parse_output_type(out_type)
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_block_count(shape.n_layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_kv)
    extra(w)
    w.add_rope_freq_base(shape.rope_base)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.top_k)
    w.add_vocab_size(shape.vocab)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, demo_dir(), shape.vocab)
    write_gguf(w, plan(qtype), qtype, Path(out))
    return Path(out)


def slice_main(write: Callable[..., Path], doc: str, default_layers: int) -> None:
    """`python -m edgemoe.models.<arch>_slice OUT --layers N --type T --seed S`."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--layers", type=int, default=default_layers)
    p.add_argument("--type", default="q4_k")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write(a.output, a.layers, a.type, a.seed))
