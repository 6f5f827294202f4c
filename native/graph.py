"""A ggml compute graph built once and computed many times with new inputs (llama.cpp's graph
reuse): the ops of `edgemoe.native.ops` on one context, allocated by a graph allocator, with
inputs copied in (`feed`) and outputs copied out (`read`) around each `compute`.

A graph that is reused (`reuse=True`: decode steps) owns its allocator, so its intermediate
tensors keep their memory between computes and it is allocated once. A one-off graph (prefill
chunks, calibration) shares the backend's scratch allocator and is allocated right before it
computes; any other scratch graph computed in between moves its memory.
"""
from __future__ import annotations

import time

import numpy as np

from edgemoe.native import ops
from edgemoe.native.buffers import StoredTensors
from edgemoe.native.lib import InitParams
from edgemoe.native.ops import Ops, Tensor

_NUMPY = {ops.F32: np.float32, ops.F16: np.float16, ops.I32: np.int32, ops.I64: np.int64}


class Graph(Ops, StoredTensors):
    # ggml creates a few tensors inside some ops (top-k is an argsort and a view): stop this early
    _MARGIN = 8

    def __init__(self, backend, label: str = "dense", max_tensors: int = 384, reuse: bool = False):
        self.backend, self.label, self.reuse = backend, label, reuse
        lib = ops.lib()
        max_nodes = 4 * max_tensors  # nodes + leaves: our tensors plus the weights/caches they read (<= 3 each)
        size = lib.ggml_tensor_overhead() * max_tensors + lib.ggml_graph_overhead_custom(max_nodes, False)
        ctx = lib.ggml_init(InitParams(size, None, True))
        if not ctx:
            raise MemoryError("ggml_init failed for a graph context")
        super().__init__(ctx)
        self.graph = lib.ggml_new_graph_custom(ctx, max_nodes, False)
        self.max_tensors, self.n_tensors = max_tensors, 0
        self.galloc = lib.ggml_gallocr_new(backend.buffer_type) if reuse else None
        self.allocated = False
        self._feeds: list[tuple[Tensor, np.ndarray]] = []
        self._bound: list[tuple[int, int, int]] = []  # (tensor, address, bytes) copied in before every compute
        self._bound_arrays: list[np.ndarray] = []     # their arrays, alive as long as the graph

    def _made(self, t: Tensor) -> Tensor:
        self.n_tensors += 1
        if self.n_tensors > self.max_tensors - self._MARGIN:
            raise RuntimeError(f"graph '{self.label}' needs more than {self.max_tensors} tensors; "
                               "build it with a larger max_tensors")
        return t

    def input(self, type_: int, ne: tuple[int, ...], name: str | None = None) -> Tensor:
        t = self.new(type_, ne)
        self.lib.ggml_set_input(t.ptr)
        if name:
            self.lib.ggml_set_name(t.ptr, name.encode())
        return t

    def expand(self, t: Tensor) -> Tensor:
        """Add t (and what it needs) to the graph now: nodes run in the order they were added."""
        if self.allocated:
            raise RuntimeError("a graph cannot grow after it was allocated")
        self.lib.ggml_build_forward_expand(self.graph, t.ptr)
        return t

    def output(self, t: Tensor) -> Tensor:
        """t is read after compute: its memory is not reused by later nodes."""
        self.lib.ggml_set_output(t.ptr)
        return self.expand(t)

    def _check_input(self, t: Tensor, array: np.ndarray) -> None:
        if array.dtype != _NUMPY[t.type] or array.nbytes != t.nbytes or not array.flags.c_contiguous:
            raise ValueError(f"graph input {t} takes {t.nbytes} contiguous bytes of {np.dtype(_NUMPY[t.type])}, "
                             f"got {array.dtype} {array.shape}")

    def feed(self, t: Tensor, array: np.ndarray) -> None:
        """Copy `array` into input t at the next compute (t's dtype and size, contiguous)."""
        self._check_input(t, array)
        self._feeds.append((t, array))

    def bind(self, t: Tensor) -> np.ndarray:
        """An array copied into input t before every compute: the caller fills it in place (a
        reused graph's per-step inputs, checked once)."""
        dims = tuple(d for d in reversed(t.ne))
        array = np.zeros(dims, dtype=_NUMPY[t.type])
        self._check_input(t, array)
        self._bound.append((t.ptr, array.ctypes.data, array.nbytes))
        self._bound_arrays.append(array)
        return array.reshape(-1)

    def _alloc(self) -> None:
        galloc = self.galloc or self.backend.scratch_galloc
        if not self.lib.ggml_gallocr_alloc_graph(galloc, self.graph):
            raise MemoryError(f"ggml could not allocate the '{self.label}' graph")
        self.allocated = True
        if not self.reuse:
            self.backend.scratch_owner = self

    def compute(self) -> None:
        if not self.allocated or (not self.reuse and self.backend.scratch_owner is not self):
            self._alloc()
        tensor_set = self.lib.ggml_backend_tensor_set
        for ptr, address, n in self._bound:
            tensor_set(ptr, address, 0, n)
        for t, array in self._feeds:
            tensor_set(t.ptr, array.ctypes.data, 0, array.nbytes)
        self._feeds.clear()
        t0 = time.perf_counter()
        status = self.lib.ggml_backend_graph_compute(self.backend.handle, self.graph)
        times = self.backend.compute_s
        times[self.label] = times.get(self.label, 0.0) + time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")

    def read(self, t: Tensor, out: np.ndarray | None = None) -> np.ndarray:
        """A computed output (contiguous) into `out` (or a new array of t's dtype, numpy shape reversed ne)."""
        if not t.contiguous:
            raise ValueError(f"{t} is not contiguous; read a ggml_cont of it")
        if out is None:
            dims = [d for d in reversed(t.ne)]
            while len(dims) > 2 and dims[0] == 1:
                dims.pop(0)
            out = np.empty(dims, dtype=_NUMPY[t.type])
        if out.nbytes != t.nbytes or out.dtype != _NUMPY[t.type] or not out.flags.c_contiguous:
            raise ValueError(f"reading {t} needs {t.nbytes} contiguous bytes of {np.dtype(_NUMPY[t.type])}")
        self.lib.ggml_backend_tensor_get(t.ptr, out.ctypes.data, 0, t.nbytes)
        return out

    def close(self) -> None:
        if self.galloc:
            self.lib.ggml_gallocr_free(self.galloc)
            self.galloc = None
        if self.backend.scratch_owner is self:
            self.backend.scratch_owner = None
        super().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
