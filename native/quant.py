"""Quantize float rows to any GGUF type with ggml's own quantizer (`ggml_quantize_chunk`).

Using ggml's code (not a re-implementation) means our bytes are bit-identical to what
llama.cpp's `llama-quantize` would write, K-quants and importance matrices included.
"""
from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.native.lib import ggml_base

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def block_size(qtype: QT) -> int:
    return int(ggml_base().ggml_blck_size(int(qtype)))


def row_bytes(qtype: QT, n_per_row: int) -> int:
    if n_per_row % block_size(qtype):
        raise ValueError(f"a {qtype.name} row needs a multiple of {block_size(qtype)} values, got {n_per_row}")
    return int(ggml_base().ggml_row_size(int(qtype), n_per_row))


def can_quantize(qtype: QT, n_per_row: int) -> bool:
    return qtype in FLOAT_TYPES or n_per_row % block_size(qtype) == 0


def quantize(rows: np.ndarray, qtype: QT, imatrix: np.ndarray | None = None) -> np.ndarray:
    """rows: float32 [n_rows, n_per_row] -> uint8 [n_rows, row_bytes] in `qtype`'s block layout.

    imatrix: optional float32 [n_per_row] importance per column (llama.cpp's imatrix).
    """
    if rows.ndim != 2:
        raise ValueError(f"quantize expects a 2-D array of rows, got shape {rows.shape}")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    if qtype == QT.F32:
        return rows.view(np.uint8).reshape(n_rows, -1)
    if qtype == QT.F16:
        return rows.astype(np.float16).view(np.uint8).reshape(n_rows, -1)
    if qtype == QT.BF16:
        return _to_bf16(rows).view(np.uint8).reshape(n_rows, -1)
    lib = ggml_base()
    out_row = row_bytes(qtype, n_per_row)  # raises on a bad row length, before ggml sees it
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix has shape {imatrix.shape}, expected ({n_per_row},)")
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} requires an importance matrix (imatrix)")
    out = np.empty((n_rows, out_row), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
        0, n_rows, n_per_row,
        None if imatrix is None else imatrix.ctypes.data_as(ctypes.c_void_p))
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def _to_bf16(rows: np.ndarray) -> np.ndarray:
    # round-to-nearest-even on the upper 16 bits, as ggml_fp32_to_bf16 does (NaNs kept quiet)
    bits = rows.view(np.uint32).astype(np.uint64)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(rows)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 64).astype(np.uint16)
    return rounded
