"""Locate and load ggml's shared libraries shipped inside the llama-cpp-python wheel.

We bind ggml's *public* C API only. Every pointer or size that reaches these functions is
checked in Python first: ggml aborts the whole process on a failed assertion.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path


class NativeLibraryError(RuntimeError):
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


def _declare_base(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.ggml_blck_size.argtypes = [c.c_int]
    lib.ggml_blck_size.restype = c.c_int64
    lib.ggml_type_size.argtypes = [c.c_int]
    lib.ggml_type_size.restype = c.c_size_t
    lib.ggml_row_size.argtypes = [c.c_int, c.c_int64]
    lib.ggml_row_size.restype = c.c_size_t
    lib.ggml_type_name.argtypes = [c.c_int]
    lib.ggml_type_name.restype = c.c_char_p
    lib.ggml_quantize_requires_imatrix.argtypes = [c.c_int]
    lib.ggml_quantize_requires_imatrix.restype = c.c_bool
    # size_t ggml_quantize_chunk(type, const float * src, void * dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float * imatrix)
    lib.ggml_quantize_chunk.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_int64,
                                        c.c_int64, c.c_int64, c.c_void_p]
    lib.ggml_quantize_chunk.restype = c.c_size_t
