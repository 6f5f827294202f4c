"""ggml's CPU weight repacking (llama.cpp's default "CPU_REPACK" extra buffer type): weights of
some types (Q4_0, Q4_K, IQ4_NL on AVX2; Q2_K on AVX-512; their NEON variants) are stored with
8 rows interleaved, and ggml's CPU backend then multiplies them with its GEMV/GEMM kernels for
that layout, including ggml_mul_mat_id over 3-D expert tensors. Measured on the 2-core test
machine, one thread, CPU time per decode token: llama.cpp on a 2-layer Mixtral-shaped q4_k slice
19 ms repacked vs 24 ms plain.

Only through public API: the buffer type comes from the CPU backend's registry
(`ggml_backend_dev_get_extra_bufts`), and whether a tensor repacks is asked of the CPU device
(`ggml_backend_dev_supports_op` on a probe matmul), as llama.cpp's loader does. Bytes enter a
repack buffer only through `ggml_backend_tensor_set` of a whole tensor (which repacks them).
"""
from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from edgemoe.dma_buffers import aligned_anonymous
from edgemoe.native import ops
from edgemoe.native.buffers import PlacedTensors
from edgemoe.native.lib import InitParams, ggml_cpu
from edgemoe.native.ops import Ops, Tensor

ROWS_INTERLEAVED = 8  # rows a repacked block holds (a multiple of every variant's 4 or 8)
_EXTRA_BUFTS = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
_PAGE = 4096


@functools.cache
def _cpu():
    """(CPU device, its registry, libggml-base with the registry calls declared)."""
    import logging

    import llama_cpp  # noqa: F401  (on import it routes ggml's log through the "llama-cpp-python" logger)

    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:  # unset, it prints ggml's debug lines (one per repacked tensor)
        log.setLevel(logging.ERROR)
    base, cpu = ops.lib(), ggml_cpu()
    P, SZ = ctypes.c_void_p, ctypes.c_size_t
    cpu.ggml_backend_cpu_reg.restype, cpu.ggml_backend_cpu_reg.argtypes = P, []
    for name, res, args in (("ggml_backend_reg_dev_get", P, [P, SZ]),
                            ("ggml_backend_reg_get_proc_address", P, [P, ctypes.c_char_p]),
                            ("ggml_backend_dev_supports_op", ctypes.c_bool, [P, P]),
                            ("ggml_backend_buft_name", ctypes.c_char_p, [P]),
                            ("ggml_backend_buft_alloc_buffer", P, [P, SZ]),
                            ("ggml_backend_buffer_get_base", P, [P])):
        f = getattr(base, name)
        f.restype, f.argtypes = res, args
    reg = cpu.ggml_backend_cpu_reg()
    return base.ggml_backend_reg_dev_get(reg, 0), reg, base


@functools.cache
def repack_buffer_type() -> int | None:
    """The CPU backend's CPU_REPACK buffer type, or None where this build has none."""
    dev, reg, base = _cpu()
    address = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return None
    bufts = _EXTRA_BUFTS(address)(dev)
    i = 0
    while bufts and bufts[i]:
        if base.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


@functools.cache
def repacks_type(qtype: int) -> bool:
    """Whether ggml's CPU backend multiplies a repacked `qtype` matrix (of rows in multiples of 8)."""
    buft = repack_buffer_type()
    if buft is None:
        return False
    dev, _, base = _cpu()
    block = base.ggml_blck_size(qtype)
    probe = RepackBuffer(ops.nbytes(qtype, (block, ROWS_INTERLEAVED, 1, 1)), max_tensors=1, what="repack probe")
    try:
        w = probe.place(qtype, (block, ROWS_INTERLEAVED), 0)
        ctx = base.ggml_init(InitParams(base.ggml_tensor_overhead() * 4, None, True))
        try:
            g = Ops(ctx)
            op = g.mul_mat(w, g.new(ops.F32, (block, 1)))
            return bool(base.ggml_backend_dev_supports_op(dev, op.ptr))
        finally:
            base.ggml_free(ctx)
    finally:
        probe.close()


def repacks(qtype: int, ne: tuple[int, ...]) -> bool:
    """Whether a weight of type qtype and shape ne (2-D matrix or 3-D stack) would be repacked."""
    return ne[1] % ROWS_INTERLEAVED == 0 and repacks_type(int(qtype))


class RepackBuffer(PlacedTensors):
    """One CPU_REPACK buffer of `nbytes`; `place` puts a tensor at an offset, `store` fills one."""

    def __init__(self, nbytes: int, max_tensors: int, what: str):
        _, _, base = _cpu()
        buft = repack_buffer_type()
        if buft is None:
            raise RuntimeError("this ggml build has no CPU_REPACK buffer type")
        buffer = base.ggml_backend_buft_alloc_buffer(buft, nbytes)
        if not buffer:
            raise MemoryError(f"{what}: could not allocate {nbytes} bytes for repacked weights")
        self._init(buffer, base.ggml_backend_buffer_get_base(buffer), nbytes, max_tensors, what)

    def store(self, t: Tensor, data: np.ndarray) -> None:
        """t := data (t's plain bytes, contiguous), repacked on the way in."""
        if data.nbytes != t.nbytes or not data.flags.c_contiguous:
            raise ValueError(f"{self.what}: {data.nbytes} bytes for a tensor of {t.nbytes}")
        self.lib.ggml_backend_tensor_set(t.ptr, data.ctypes.data, 0, data.nbytes)

    def release(self, offset: int, nbytes: int) -> None:
        """Give the whole pages of [offset, offset + nbytes) back to the system (their bytes are not needed)."""
        start = -(-(self.address + offset) // _PAGE) * _PAGE
        end = (self.address + offset + nbytes) // _PAGE * _PAGE
        if end > start:
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return libc


_staging = threading.local()


def staging(nbytes: int) -> np.ndarray:
    """This thread's reusable page-aligned buffer, of nbytes (a matrix's plain bytes before they are
    repacked; it grows to the largest matrix a thread loads and stays: no page faults per load)."""
    buf = getattr(_staging, "buf", None)
    if buf is None or buf.nbytes < nbytes:  # huge pages: the loader's O_DIRECT reads land here
        size = max(nbytes, _PAGE)
        memory, start = aligned_anonymous(size)
        _staging.buf = buf = np.frombuffer(memory, dtype=np.uint8, count=size, offset=start)
    return buf[:nbytes]
