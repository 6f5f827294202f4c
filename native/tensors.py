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


@dataclass
class _Input:
    tensor: int
    array: np.ndarray


class Graph:
    """One compute graph: declare inputs and ops, then `compute` returns the outputs as numpy.

    Activations are small (tokens x hidden), so inputs are copied in; weights are not copied.
    Every op's operand widths and the graph's leaf and node counts are checked here before ggml
    sees them: ggml asserts (aborts the process) on a matmul whose widths disagree and on a graph
    with more than `max_nodes` leaves (weights and inputs) or nodes (ops).
    """

    # Sized for our graphs (a layer's experts: ~6 nodes each): the context's metadata is malloc'd
    # per graph, and a large one costs a fresh mmap + page faults on every decode step.
    MAX_TENSORS = 512
    MAX_NODES = 256

    def __init__(self, backend: CpuBackend, max_nodes: int = MAX_NODES, label: str = "other"):
        self.lib, self.backend, self.label = ggml_base(), backend, label
        size = self.lib.ggml_tensor_overhead() * self.MAX_TENSORS + self.lib.ggml_graph_overhead_custom(max_nodes, False)
        self.ctx = self.lib.ggml_init(InitParams(size, None, True))
        self.graph = self.lib.ggml_new_graph_custom(self.ctx, max_nodes, False)
        self.inputs: list[_Input] = []
        self.n_tensors = 0
        self.max_nodes, self.n_leafs, self.n_nodes = max_nodes, 0, 0
        self.ne: dict[int, tuple[int, int]] = {}  # tensor made here -> ggml (ne0, ne1): (cols, rows)
        self._weights: set[int] = set()  # weight tensors already counted as leaves

    def _count(self, t: int, ne: tuple[int, int], leafs: int = 0, nodes: int = 1) -> int:
        self.n_tensors += 1
        self.n_leafs += leafs
        self.n_nodes += nodes
        if self.n_tensors >= self.MAX_TENSORS or self.n_leafs > self.max_nodes or self.n_nodes > self.max_nodes:
            raise RuntimeError(f"graph too large ({self.n_leafs} leaves, {self.n_nodes} nodes, {self.n_tensors} "
                               f"tensors; at most {self.max_nodes}, {self.max_nodes}, {self.MAX_TENSORS - 1}); "
                               "split the computation")
        self.ne[t] = ne
        return t

    def input(self, array: np.ndarray) -> int:
        """float32 [rows, cols] (or [cols]) -> an input tensor with ne = (cols, rows)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim not in (1, 2) or 0 in array.shape:
            raise ValueError(f"graph inputs are non-empty 1-D or 2-D arrays, got shape {array.shape}")
        cols, rows = array.shape[-1], (array.shape[0] if array.ndim == 2 else 1)
        if array.ndim == 1:
            t = self.lib.ggml_new_tensor_1d(self.ctx, int(QT.F32), cols)
        else:
            t = self.lib.ggml_new_tensor_2d(self.ctx, int(QT.F32), cols, rows)
        self.lib.ggml_set_input(t)
        self.inputs.append(_Input(t, array))
        return self._count(t, (cols, rows), leafs=1, nodes=0)

    def matmul(self, w: Weight, x: int) -> int:
        """x: [T, cols] -> [T, rows]."""
        cols, rows = self.ne[x]
        if cols != w.cols:
            raise ValueError(f"{w.name}: the input has {cols} values per row, the {w.rows}x{w.cols} weight needs {w.cols}")
        new_leaf = w.tensor not in self._weights
        self._weights.add(w.tensor)
        return self._count(self.lib.ggml_mul_mat(self.ctx, w.tensor, x), (w.rows, rows), leafs=int(new_leaf))

    def _same(self, op: str, a: int, b: int) -> tuple[int, int]:
        if self.ne[a] != self.ne[b]:
            raise ValueError(f"{op}: operands of shape {self.ne[a]} and {self.ne[b]} (ggml ne) differ")
        return self.ne[a]

    def _broadcast(self, op: str, a: int, b: int) -> tuple[int, int]:
        # ggml_can_repeat(b, a): each of b's dims divides a's
        if any(nb == 0 or na % nb for na, nb in zip(self.ne[a], self.ne[b])):
            raise ValueError(f"{op}: an operand of shape {self.ne[b]} does not broadcast to {self.ne[a]} (ggml ne)")
        return self.ne[a]

    # each op's shape is checked before ggml sees its operands
    def swiglu(self, gate: int, up: int) -> int:
        ne = self._same("swiglu", gate, up)
        return self._count(self.lib.ggml_swiglu_split(self.ctx, gate, up), ne)

    def add(self, a: int, b: int) -> int:
        ne = self._broadcast("add", a, b)
        return self._count(self.lib.ggml_add(self.ctx, a, b), ne)

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
