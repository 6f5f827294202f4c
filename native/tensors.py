"""Quantized weight bytes wrapped as ggml tensors, zero copy, and small graphs over them.

Every size, alignment and type is checked here before any pointer reaches ggml: ggml aborts
the process on a failed assertion instead of raising.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.native.backend import CpuBackend
from edgemoe.native.lib import InitParams, ggml_base
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


@dataclass
class _Input:
    tensor: int
    array: np.ndarray


class Graph:
    """One compute graph: declare inputs and ops, then `compute` returns the outputs as numpy.

    Activations are small (tokens x hidden), so inputs are copied in; weights are not copied.
    """

    # Sized for our graphs (a layer's experts: ~6 nodes each): the context's metadata is malloc'd
    # per graph, and a large one costs a fresh mmap + page faults on every decode step.
    MAX_TENSORS = 512

    def __init__(self, backend: CpuBackend, max_nodes: int = 256, label: str = "other"):
        self.lib, self.backend, self.label = ggml_base(), backend, label
        size = self.lib.ggml_tensor_overhead() * self.MAX_TENSORS + self.lib.ggml_graph_overhead_custom(max_nodes, False)
        self.ctx = self.lib.ggml_init(InitParams(size, None, True))
        self.graph = self.lib.ggml_new_graph_custom(self.ctx, max_nodes, False)
        self.inputs: list[_Input] = []
        self.n_tensors = 0

    def _count(self, t: int) -> int:
        self.n_tensors += 1
        if self.n_tensors >= self.MAX_TENSORS:
            raise RuntimeError("graph too large; split the computation")
        return t

    def input(self, array: np.ndarray) -> int:
        """float32 [rows, cols] (or [cols]) -> an input tensor with ne = (cols, rows)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1:
            t = self.lib.ggml_new_tensor_1d(self.ctx, int(QT.F32), array.shape[0])
        elif array.ndim == 2:
            t = self.lib.ggml_new_tensor_2d(self.ctx, int(QT.F32), array.shape[1], array.shape[0])
        else:
            raise ValueError(f"graph inputs are 1-D or 2-D, got shape {array.shape}")
        self.lib.ggml_set_input(t)
        self.inputs.append(_Input(t, array))
        return self._count(t)

    def matmul(self, w: Weight, x: int) -> int:
        """x: [T, cols] -> [T, rows]."""
        return self._count(self.lib.ggml_mul_mat(self.ctx, w.tensor, x))

    def swiglu(self, gate: int, up: int) -> int:
        return self._count(self.lib.ggml_swiglu_split(self.ctx, gate, up))

    def geglu(self, gate: int, up: int) -> int:
        return self._count(self.lib.ggml_geglu_split(self.ctx, gate, up))

    def add(self, a: int, b: int) -> int:
        return self._count(self.lib.ggml_add(self.ctx, a, b))

    def mul(self, a: int, b: int) -> int:
        return self._count(self.lib.ggml_mul(self.ctx, a, b))

    def compute(self, outputs: list[tuple[int, tuple[int, ...]]]) -> list[np.ndarray]:
        """outputs: (tensor, numpy shape) pairs; returns float32 arrays of those shapes."""
        for t, _ in outputs:
            self.lib.ggml_set_output(t)
            self.lib.ggml_build_forward_expand(self.graph, t)
        if not self.lib.ggml_gallocr_alloc_graph(self.backend.galloc, self.graph):
            raise MemoryError("ggml could not allocate the compute graph")
        for inp in self.inputs:
            self.lib.ggml_backend_tensor_set(inp.tensor, ctypes.c_void_p(inp.array.ctypes.data), 0, inp.array.nbytes)
        t0 = time.perf_counter()
        status = self.lib.ggml_backend_graph_compute(self.backend.handle, self.graph)
        times = self.backend.compute_s
        times[self.label] = times.get(self.label, 0.0) + time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        results = []
        for t, shape in outputs:
            out = np.empty(shape, dtype=np.float32)
            if self.lib.ggml_nbytes(t) != out.nbytes:
                raise ValueError(f"output has {self.lib.ggml_nbytes(t)} bytes, shape {shape} expects {out.nbytes}")
            self.lib.ggml_backend_tensor_get(t, ctypes.c_void_p(out.ctypes.data), 0, out.nbytes)
            results.append(out)
        return results

    def close(self) -> None:
        if self.ctx:
            self.lib.ggml_free(self.ctx)
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
