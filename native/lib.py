"""Locate and load ggml's shared libraries shipped inside the llama-cpp-python wheel.

We bind ggml's *public* C API only. Every pointer or size that reaches these functions is
checked in Python first: ggml aborts the whole process on a failed assertion.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

from edgemoe.errors import EdgemoeError


class NativeLibraryError(EdgemoeError, RuntimeError):
    """ggml's shared libraries could not be found or loaded."""


def _llama_cpp_lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise NativeLibraryError(
            "llama-cpp-python is not installed; install it with `pip install llama-cpp-python==0.3.36` "
            "(it builds from source, ~15 min on 2 cores)")
    lib_dir = Path(spec.origin).parent / "lib"
    if not lib_dir.is_dir():
        raise NativeLibraryError(f"llama-cpp-python has no lib/ folder at {lib_dir}; reinstall it")
    return lib_dir


def _find(lib_dir: Path, stem: str) -> Path:
    for suffix in (".so", ".dylib", ".dll"):
        for prefix in ("lib", ""):
            path = lib_dir / f"{prefix}{stem}{suffix}"
            if path.exists():
                return path
    raise NativeLibraryError(f"{stem} not found in {lib_dir}; this llama-cpp-python build lacks it")


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """libggml-base: types, tensors, graphs, quantization."""
    lib = ctypes.CDLL(str(_find(_llama_cpp_lib_dir(), "ggml-base")), mode=ctypes.RTLD_GLOBAL)
    _declare_base(lib)
    return lib


@functools.cache
def ggml_cpu() -> ctypes.CDLL:
    """libggml-cpu: the CPU backend (threads, SIMD kernels)."""
    ggml_base()
    lib = ctypes.CDLL(str(_find(_llama_cpp_lib_dir(), "ggml-cpu")), mode=ctypes.RTLD_GLOBAL)
    c = ctypes
    lib.ggml_backend_cpu_init.argtypes = []
    lib.ggml_backend_cpu_init.restype = c.c_void_p
    lib.ggml_backend_cpu_set_n_threads.argtypes = [c.c_void_p, c.c_int]
    lib.ggml_backend_cpu_set_n_threads.restype = None
    return lib


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _fn(lib: ctypes.CDLL, name: str, restype, *argtypes) -> None:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)


def _declare_base(lib: ctypes.CDLL) -> None:
    c = ctypes
    P, SZ, I64, INT, BOOL = c.c_void_p, c.c_size_t, c.c_int64, c.c_int, c.c_bool
    # contexts, tensors, graphs (ggml.h)
    _fn(lib, "ggml_init", P, InitParams)
    _fn(lib, "ggml_free", None, P)
    _fn(lib, "ggml_tensor_overhead", SZ)
    _fn(lib, "ggml_graph_overhead_custom", SZ, SZ, BOOL)
    _fn(lib, "ggml_new_tensor_1d", P, P, INT, I64)
    _fn(lib, "ggml_new_tensor_2d", P, P, INT, I64, I64)
    _fn(lib, "ggml_nbytes", SZ, P)
    _fn(lib, "ggml_set_input", None, P)
    _fn(lib, "ggml_set_output", None, P)
    for op in ("ggml_mul_mat", "ggml_mul", "ggml_add", "ggml_swiglu_split"):
        _fn(lib, op, P, P, P, P)
    _fn(lib, "ggml_cont", P, P, P)
    _fn(lib, "ggml_mul_mat_id", P, P, P, P, P)
    _fn(lib, "ggml_new_graph_custom", P, P, SZ, BOOL)
    _fn(lib, "ggml_build_forward_expand", None, P, P)
    # backends and buffers (ggml-backend.h, ggml-alloc.h)
    _fn(lib, "ggml_backend_cpu_buffer_from_ptr", P, P, SZ)
    _fn(lib, "ggml_backend_cpu_buffer_type", P)
    _fn(lib, "ggml_backend_buffer_free", None, P)
    _fn(lib, "ggml_backend_tensor_alloc", INT, P, P, P)
    _fn(lib, "ggml_backend_tensor_set", None, P, P, SZ, SZ)
    _fn(lib, "ggml_backend_tensor_get", None, P, P, SZ, SZ)
    _fn(lib, "ggml_backend_graph_compute", INT, P, P)
    _fn(lib, "ggml_backend_free", None, P)
    _fn(lib, "ggml_gallocr_new", P, P)
    _fn(lib, "ggml_gallocr_free", None, P)
    _fn(lib, "ggml_gallocr_alloc_graph", BOOL, P, P)
    lib.ggml_blck_size.argtypes = [c.c_int]
    lib.ggml_blck_size.restype = c.c_int64
    lib.ggml_type_size.argtypes = [c.c_int]
    lib.ggml_type_size.restype = c.c_size_t
    lib.ggml_row_size.argtypes = [c.c_int, c.c_int64]
    lib.ggml_row_size.restype = c.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [c.c_int]
    lib.ggml_quantize_requires_imatrix.restype = c.c_bool
    # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float * imatrix)
    lib.ggml_quantize_chunk.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_int64,
                                        c.c_int64, c.c_int64, c.c_void_p]
    lib.ggml_quantize_chunk.restype = c.c_size_t
