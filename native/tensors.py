"""Quantized weight bytes wrapped as ggml tensors, zero copy (a resident expert's matrices).

Every size, alignment and type is checked here before any pointer reaches ggml: ggml aborts
the process on a failed assertion instead of raising.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.native.buffers import HostTensors
from edgemoe.native.ops import NO_MATMUL  # weight types ggml cannot multiply (it segfaults)
from edgemoe.native.quant import row_bytes


def aligned_empty(nbytes: int) -> np.ndarray:
    """uint8 buffer of `nbytes` whose data pointer is 64-byte aligned."""
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start:start + nbytes]


class Weight(HostTensors):
    """A [rows=out_features, cols=in_features] matrix in `qtype`, over caller-owned bytes: one
    tensor (`tensor`, ggml ne (cols, rows)) placed in a buffer over them.

    The caller keeps `data` alive and unchanged while this object is used.
    """

    def __init__(self, data: np.ndarray, qtype: QT, rows: int, cols: int, name: str = "weight"):
        if qtype in NO_MATMUL:
            raise ValueError(f"{name}: ggml cannot multiply a {qtype.name} weight (no CPU dot product for it)")
        expected = rows * row_bytes(qtype, cols)
        if data.dtype != np.uint8 or data.ndim != 1 or not data.flags.c_contiguous:
            raise ValueError(f"{name}: weight bytes must be a contiguous 1-D uint8 array")
        if data.nbytes != expected:
            raise ValueError(f"{name}: {data.nbytes} bytes given, {qtype.name} [{rows}x{cols}] needs {expected}")
        self.data, self.qtype, self.rows, self.cols, self.name = data, qtype, rows, cols, name
        super().__init__(data.ctypes.data, expected, max_tensors=1, what=name)
        self.tensor = self.place(int(qtype), (cols, rows), 0, expected).ptr
