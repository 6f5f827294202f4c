"""Dual precision (the HOBBIT idea): a low-bit copy of every expert stays resident, so a cache
miss can be computed at once on the low copy while the full-precision copy loads.

The low copies are made when the engine starts: each expert is read once from the file,
dequantized and re-quantized to the low type with ggml's quantizer (no importance matrix: the
file does not carry one). An expert stored at or below the low type's bits is copied as is and
marked exact: serving it from the copy loses nothing. The copies live in their own memory,
outside the cache's `budget_bytes`; `nbytes` is that memory, measured from the buffers.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.errors import InputError
from edgemoe.expert_store import ExpertPart, ExpertSpec, ResidentExpert, read_expert
from edgemoe.native.quant import FLOAT_TYPES, quantize, row_bytes
from edgemoe.policies import Key

LOW_TYPES = {"q2_k": QT.Q2_K, "q3_k": QT.Q3_K, "q4_k": QT.Q4_K, "q4_0": QT.Q4_0}


def parse_low_type(name: str) -> QT:
    try:
        return LOW_TYPES[name.lower()]
    except KeyError:
        raise InputError(f"dual precision low type {name!r} is not one of {', '.join(LOW_TYPES)}") from None


def bits_per_weight(qtype: QT) -> float:
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * type_bytes / block


class LowCopies:
    """Built with `n_threads` workers (ggml's quantizer releases the GIL): one expert in flight
    per worker, so building needs a few experts of memory beyond the copies themselves. The
    copies are frames of their own arenas (edgemoe/arenas.py), always resident."""

    def __init__(self, path: str | os.PathLike, specs: dict[Key, ExpertSpec], low_type: QT, n_threads: int = 1):
        from edgemoe.arenas import ExpertArenas

        start = time.perf_counter()
        self.low_type = low_type
        self.exact = {key for key, spec in specs.items()
                      if all(bits_per_weight(p.qtype) <= bits_per_weight(low_type) for p in spec.parts)}
        low_specs = {key: spec if key in self.exact else low_spec(spec, low_type) for key, spec in specs.items()}
        self.arenas = ExpertArenas(low_specs, None, "dual-precision low copies")
        self.experts = {key: self.arenas.allocate(spec) for key, spec in low_specs.items()}
        fd = os.open(os.fspath(path), os.O_RDONLY)
        size = os.fstat(fd).st_size

        def build(key: Key) -> None:
            high = read_expert(fd, specs[key], size)
            try:
                frame = self.experts[key].buffer
                if key in self.exact:  # already this small: the copy is the file's bytes
                    frame[:high.buffer.nbytes] = high.buffer
                else:
                    _requantize(high, low_specs[key], frame)
            finally:
                high.close()

        try:
            with ThreadPoolExecutor(max(1, n_threads)) as pool:
                list(pool.map(build, specs))
        finally:
            os.close(fd)
        self.nbytes = self.arenas.committed_bytes
        self.build_s = time.perf_counter() - start

    def close(self) -> None:
        self.experts.clear()
        self.arenas.close()


def low_spec(spec: ExpertSpec, low_type: QT) -> ExpertSpec:
    """The layout of `spec`'s low copy: each part in `low_type` where its rows fit the type's
    blocks, else f16 (a float part stays in its own float type)."""
    parts = []
    for p in spec.parts:
        qtype = low_type if p.cols % gguf.GGML_QUANT_SIZES[low_type][0] == 0 else QT.F16
        if qtype in FLOAT_TYPES and p.qtype in FLOAT_TYPES:
            qtype = p.qtype
        parts.append(ExpertPart(p.role, qtype, p.rows, p.cols, -1, p.rows * row_bytes(qtype, p.cols)))
    return ExpertSpec(spec.layer, spec.expert, tuple(parts))


def _requantize(expert: ResidentExpert, spec: ExpertSpec, into: np.ndarray) -> None:
    """expert's matrices, dequantized and quantized to `spec`'s types, into buffer `into` at spec's layout."""
    for p, low, pos in zip(expert.spec.parts, spec.parts, spec.layout()[1]):
        rows = np.asarray(gguf.quants.dequantize(expert.weights[p.role].data.reshape(p.rows, -1), p.qtype),
                          dtype=np.float32)
        into[pos:pos + low.nbytes] = quantize(rows.reshape(p.rows, p.cols), low.qtype).reshape(-1)
