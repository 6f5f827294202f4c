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
from edgemoe.native.tensors import aligned_empty
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
    per worker, so building needs a few experts of memory beyond the copies themselves."""

    def __init__(self, path: str | os.PathLike, specs: dict[Key, ExpertSpec], low_type: QT, n_threads: int = 1):
        start = time.perf_counter()
        self.low_type = low_type
        self.exact = {key for key, spec in specs.items()
                      if all(bits_per_weight(p.qtype) <= bits_per_weight(low_type) for p in spec.parts)}
        fd = os.open(os.fspath(path), os.O_RDONLY)
        size = os.fstat(fd).st_size

        def build(key: Key) -> ResidentExpert:
            high = read_expert(fd, specs[key], size)
            if key in self.exact:
                return high  # already this small: the copy is the file's bytes
            try:
                return _requantize(high, low_type)
            finally:
                high.close()

        try:
            with ThreadPoolExecutor(max(1, n_threads)) as pool:
                self.experts: dict[Key, ResidentExpert] = dict(zip(specs, pool.map(build, specs)))
        finally:
            os.close(fd)
        self.nbytes = sum(ex.buffer.nbytes for ex in self.experts.values())
        self.build_s = time.perf_counter() - start

    def close(self) -> None:
        for ex in self.experts.values():
            ex.close()
        self.experts.clear()


def _requantize(expert: ResidentExpert, low_type: QT) -> ResidentExpert:
    parts, blobs = [], []
    for p in expert.spec.parts:
        w = expert.weights[p.role]
        rows = np.asarray(gguf.quants.dequantize(w.data.reshape(p.rows, -1), p.qtype), dtype=np.float32)
        qtype = low_type if p.cols % gguf.GGML_QUANT_SIZES[low_type][0] == 0 else QT.F16
        if qtype in FLOAT_TYPES and p.qtype in FLOAT_TYPES:
            qtype = p.qtype
        blob = quantize(rows.reshape(p.rows, p.cols), qtype).reshape(-1)
        parts.append(ExpertPart(p.role, qtype, p.rows, p.cols, -1, p.rows * row_bytes(qtype, p.cols)))
        blobs.append(blob)
    spec = ExpertSpec(expert.spec.layer, expert.spec.expert, tuple(parts))
    size, positions = spec.layout()
    buffer = aligned_empty(size)
    for blob, pos in zip(blobs, positions):
        buffer[pos:pos + blob.nbytes] = blob
    return ResidentExpert(spec, buffer)
