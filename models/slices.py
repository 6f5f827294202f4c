"""What the benchmark slices share: quantized random rows, tensor names, the expert tensors of a
layer, the `SliceSpec` each slice module builds, and the stock writer (the per-expert
mixed-precision writer of the same spec is edgemoe/models/mixed_slice.py). A slice has a real
model's true dimensions and a few layers of random weights, written straight to GGUF in
llama.cpp's stock layout: the real compute and I/O cost per token, in a file a laptop can hold.

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


@dataclass(frozen=True)
class SliceSpec:
    """Everything a slice's file is made from: the stock writer and the mixed-precision one
    (edgemoe/models/mixed_slice.py) write the same spec."""
    arch: gguf.MODEL_ARCH
    name: str
    shape: SliceShape
    plan: Callable[[QT], list[PlannedTensor]]             # tensors, given the type of the quantized ones
    extra: Callable[[gguf.GGUFWriter], None] = lambda w: None  # metadata only this architecture has


def add_hparams(w: gguf.GGUFWriter, spec: SliceSpec) -> None:
    """The hyperparameters of `spec` (what a converter's `write_hparams` writes)."""
    shape = spec.shape
    w.add_block_count(shape.n_layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_kv)
    spec.extra(w)
    w.add_rope_freq_base(shape.rope_base)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.top_k)
    w.add_vocab_size(shape.vocab)


def write_slice(out: str | Path, spec: SliceSpec, out_type: str, on_progress=None) -> Path:
    """Metadata, the demo's BPE padded to the vocab size, then the tensors of `spec.plan(qtype)`,
    written atomically in llama.cpp's stock layout (`on_progress(done, total, name)` as convert's)."""
    qtype, file_type = parse_output_type(out_type)
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[spec.arch])
    w.add_name(spec.name)
    add_hparams(w, spec)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, demo_dir(), spec.shape.vocab)
    write_gguf(w, spec.plan(qtype), qtype, Path(out), on_progress)
    return Path(out)


def slice_main(spec_for: Callable[[int, int], SliceSpec], doc: str, default_layers: int) -> None:
    """`python -m edgemoe.models.<arch>_slice OUT --layers N --type T --seed S [--mixed-bits B
    [--mixed-types TYPES] [--mixed-per expert|layer]]`."""
    import argparse

    from edgemoe.converters.mixed import GRANULARITIES, parse_candidate_types
    from edgemoe.models.mixed_slice import Q3_K_BITS, write_mixed_slice

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--layers", type=int, default=default_layers)
    p.add_argument("--type", default="q4_k", help="type of every tensor (with --mixed-bits: of the dense ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-bits", type=float, default=None, metavar="BITS",
                   help="write edgemoe's extended layout instead, each expert in its own type, all experts "
                        f"within BITS bits per expert weight ({Q3_K_BITS} = q3_k's bytes); engine only, "
                        "llama.cpp cannot load it (edgemoe/models/mixed_slice.py)")
    p.add_argument("--mixed-types", default=None, metavar="TYPES",
                   help="with --mixed-bits: expert types to choose from, as `edgemoe convert --mixed-types` "
                        "(default q2_k..q8_0; 'repacked': those this machine's CPU backend repacks)")
    p.add_argument("--mixed-per", choices=GRANULARITIES, default="expert",
                   help="with --mixed-bits: a type per expert (default) or one per layer, as `edgemoe convert --mixed-per`")
    a = p.parse_args()
    spec = spec_for(a.layers, a.seed)
    from rich.console import Console

    from edgemoe.commands.common import write_progress

    # minutes of work (a 16-layer Qwen3 mix: ~10): the bar shows the tensor being written
    with write_progress(Console(stderr=True), "writing" if a.mixed_bits is None else "planning types") as (on_progress, _):
        if a.mixed_bits is None:
            done = str(write_slice(a.output, spec, a.type, on_progress))
        else:
            done = write_mixed_slice(a.output, spec, a.mixed_bits, a.type, on_progress,
                                     parse_candidate_types(a.mixed_types), a.mixed_per).summary()
    print(done)
