"""Quantized weight bytes wrapped as ggml tensors, zero copy (a resident expert's matrices).

Every size, alignment and type is checked here before any pointer reaches ggml: ggml aborts
the process on a failed assertion instead of raising.
"""
from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.native.lib import InitParams, ggml_base
from edgemoe.native.ops import NO_MATMUL  # weight types ggml cannot multiply (it segfaults)
from edgemoe.native.quant import row_bytes

ALIGNMENT = 32  # ggml_backend_cpu_buffer_from_ptr asserts 32-byte alignment


def aligned_empty(nbytes: int) -> np.ndarray:
    """uint8 buffer of `nbytes` whose data pointer is 64-byte aligned."""
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start:start + nbytes]


class Weight:
    """A [rows=out_features, cols=in_features] matrix in `qtype`, over caller-owned bytes.

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
        if data.ctypes.data % ALIGNMENT:
            raise ValueError(f"{name}: weight bytes at {data.ctypes.data:#x} are not {ALIGNMENT}-byte aligned")
        self.lib = ggml_base()
        self.data, self.qtype, self.rows, self.cols, self.name = data, qtype, rows, cols, name
        self.ctx = self.lib.ggml_init(InitParams(self.lib.ggml_tensor_overhead() + 256, None, True))
        self.tensor = self.lib.ggml_new_tensor_2d(self.ctx, int(qtype), cols, rows)
        if self.lib.ggml_nbytes(self.tensor) != expected:
            raise ValueError(f"{name}: ggml computes {self.lib.ggml_nbytes(self.tensor)} bytes, expected {expected}")
        self.buffer = self.lib.ggml_backend_cpu_buffer_from_ptr(ctypes.c_void_p(data.ctypes.data), expected)
        status = self.lib.ggml_backend_tensor_alloc(self.buffer, self.tensor, ctypes.c_void_p(data.ctypes.data))
        if status != 0:
            raise RuntimeError(f"{name}: ggml_backend_tensor_alloc failed with status {status}")

    def close(self) -> None:
        if self.ctx:
            self.lib.ggml_backend_buffer_free(self.buffer)
            self.lib.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
