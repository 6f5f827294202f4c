"""The compute backend: a ggml CPU backend with one persistent thread pool (its workers wait for
the next graph instead of being created and joined for every compute) and graph allocators.

CUDA/Vulkan builds of llama-cpp-python would expose further backends; this wheel is CPU-only,
and `available_backends()` reports what the installed build really has.
"""
from __future__ import annotations

import ctypes
import os

from edgemoe.native import ops
from edgemoe.native.lib import NativeLibraryError, ggml_base, ggml_cpu


def new_threadpool(n_threads: int) -> int:
    """A persistent ggml CPU thread pool (free it with ggml_cpu().ggml_threadpool_free)."""
    params = ops.lib().ggml_threadpool_params_default(n_threads)
    pool = ggml_cpu().ggml_threadpool_new(ctypes.byref(params))
    if not pool:
        raise NativeLibraryError(f"ggml_threadpool_new failed for {n_threads} threads")
    return pool


class CpuBackend:
    def __init__(self, n_threads: int | None = None):
        self.base, self.cpu = ggml_base(), ggml_cpu()
        self.handle = self.cpu.ggml_backend_cpu_init()
        if not self.handle:
            raise NativeLibraryError("ggml_backend_cpu_init failed")
        self.threadpool = None
        self.set_threads(n_threads or os.cpu_count() or 1)
        self.galloc = self.base.ggml_gallocr_new(self.base.ggml_backend_cpu_buffer_type())
        self.buffer_type = ops.lib().ggml_backend_get_default_buffer_type(self.handle)
        # one-off graphs (edgemoe.native.graph.Graph, reuse=False) share this allocator; the owner
        # is the graph whose tensors hold its memory now
        self.scratch_galloc = self.base.ggml_gallocr_new(self.buffer_type)
        self.scratch_owner = None
        # seconds spent in graph compute, by label ("dense", "experts"): where a token's time goes
        self.compute_s: dict[str, float] = {}

    def set_threads(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"thread count must be >= 1, got {n_threads}")
        pool = new_threadpool(n_threads)
        self.n_threads = n_threads
        self.cpu.ggml_backend_cpu_set_n_threads(self.handle, n_threads)
        self.cpu.ggml_backend_cpu_set_threadpool(self.handle, pool)
        if self.threadpool:
            self.cpu.ggml_threadpool_free(self.threadpool)
        self.threadpool = pool

    def reset_scratch(self) -> None:
        """Give back the scratch allocator's memory (sized by the largest one-off graph, a prefill's)."""
        self.base.ggml_gallocr_free(self.scratch_galloc)
        self.scratch_galloc = self.base.ggml_gallocr_new(self.buffer_type)
        self.scratch_owner = None

    def close(self) -> None:
        if self.handle:
            self.base.ggml_gallocr_free(self.galloc)
            self.base.ggml_gallocr_free(self.scratch_galloc)
            self.base.ggml_backend_free(self.handle)
            self.cpu.ggml_threadpool_free(self.threadpool)
            self.handle = self.threadpool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def available_backends() -> list[str]:
    """Backends the installed ggml build provides (CPU always)."""
    names = ["cpu"]
    lib = ggml_base()
    try:
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_name.restype = ctypes.c_char_p
        lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        ggml_cpu()
        for i in range(lib.ggml_backend_dev_count()):
            name = lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i)).decode().lower()
            if not name.startswith("cpu") and name not in names:
                names.append(name)
    except AttributeError:
        pass
    return names
