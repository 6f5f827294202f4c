"""The compute backend: a ggml CPU backend with its thread count and a reusable graph allocator.

CUDA/Vulkan builds of llama-cpp-python would expose further backends; this wheel is CPU-only,
and `available_backends()` reports what the installed build really has.
"""
from __future__ import annotations

import ctypes
import os

from edgemoe.native.lib import NativeLibraryError, ggml_base, ggml_cpu


class CpuBackend:
    def __init__(self, n_threads: int | None = None):
        self.base, self.cpu = ggml_base(), ggml_cpu()
        self.handle = self.cpu.ggml_backend_cpu_init()
        if not self.handle:
            raise NativeLibraryError("ggml_backend_cpu_init failed")
        self.n_threads = n_threads or os.cpu_count() or 1
        self.cpu.ggml_backend_cpu_set_n_threads(self.handle, self.n_threads)
        self.galloc = self.base.ggml_gallocr_new(self.base.ggml_backend_cpu_buffer_type())
        # seconds spent in graph compute, by label ("dense", "experts"): where a token's time goes
        self.compute_s: dict[str, float] = {}

    def set_threads(self, n_threads: int) -> None:
        if n_threads < 1:
            raise ValueError(f"thread count must be >= 1, got {n_threads}")
        self.n_threads = n_threads
        self.cpu.ggml_backend_cpu_set_n_threads(self.handle, n_threads)

    def close(self) -> None:
        if self.handle:
            self.base.ggml_gallocr_free(self.galloc)
            self.base.ggml_backend_free(self.handle)
            self.handle = None

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
