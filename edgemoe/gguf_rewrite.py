"""Rewrite a GGUF file with changed metadata or regrouped tensors, atomically (temp file + rename),
streaming tensor bytes from the source in bounded chunks (memory stays near one chunk).

Every key/value pair is copied as stored (strings as raw bytes, arrays with their item type);
tensors are copied byte for byte, each either one source tensor or several concatenated (the
upgrade of per-expert files). Used by `edgemoe predictor train --embed` and `edgemoe upgrade`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from edgemoe.gguf_file import GGUFFile

CHUNK_BYTES = 8 << 20
_ALIGNMENT_KEY = "general.alignment"
_SKIPPED_KEYS = ("general.architecture", _ALIGNMENT_KEY)  # the writer adds these itself


@dataclass(frozen=True)
class TensorSource:
    """One output tensor: numpy-order shape, type, and the (offset, nbytes) ranges of the source
    file whose concatenation is its data."""
    name: str
    shape: tuple[int, ...]
    qtype: QT
    pieces: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.pieces)


def same_tensors(model: GGUFFile) -> list[TensorSource]:
    """Every tensor of `model` unchanged, in file order."""
    return [TensorSource(t.name, t.shape, t.qtype, ((t.offset, t.nbytes),))
            for t in sorted(model.tensors.values(), key=lambda t: t.offset)]


@dataclass(frozen=True)
class KV:
    """A metadata value as GGUF stores it."""
    value: object
    vtype: VT
    sub_type: VT | None = None


def _stored(model: GGUFFile, key: str) -> KV:
    f = model.fields[key]
    return KV(model.raw_field(key), VT(f.vtype), VT(f.sub_type) if f.sub_type is not None else None)


def rewrite(model: GGUFFile, out: Path, tensors: list[TensorSource], set_kv: dict[str, KV] | None = None,
            drop_kv: tuple[str, ...] = ()) -> None:
    """Write `model`'s metadata (minus `drop_kv`, plus `set_kv`) and `tensors` to `out`, atomically."""
    from edgemoe.converters.atomic import atomic_output

    w = gguf.GGUFWriter(path=None, arch=model.arch)
    alignment = model.field(_ALIGNMENT_KEY)
    if alignment is not None:
        w.add_custom_alignment(int(alignment))
    set_kv = set_kv or {}
    for key in model.fields:
        if key in _SKIPPED_KEYS or key in drop_kv or key in set_kv:
            continue
        kv = _stored(model, key)
        if kv.vtype == VT.ARRAY and not kv.value:
            continue  # gguf-py cannot write an empty array (and it carries nothing)
        w.add_key_value(key, kv.value, kv.vtype, sub_type=kv.sub_type)
    for key, kv in set_kv.items():
        w.add_key_value(key, kv.value, kv.vtype, sub_type=kv.sub_type)
    for t in tensors:
        block, type_bytes = gguf.GGML_QUANT_SIZES[t.qtype]
        w.add_tensor_info(t.name, (*t.shape[:-1], t.shape[-1] // block * type_bytes), np.dtype(np.uint8),
                          t.nbytes, raw_dtype=t.qtype)
    with atomic_output(Path(out)) as tmp:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        try:
            fout = w.fout[0]
            w.write_padding(fout, fout.tell())
            fd = os.open(model.path, os.O_RDONLY)
            try:
                for t in tensors:
                    for offset, nbytes in t.pieces:
                        _copy(fd, offset, nbytes, fout)
                    w.write_padding(fout, t.nbytes)
            finally:
                os.close(fd)
        finally:
            w.close()


def _copy(fd: int, offset: int, nbytes: int, fout) -> None:
    done = 0
    while done < nbytes:
        chunk = os.pread(fd, min(CHUNK_BYTES, nbytes - done), offset + done)
        if not chunk:
            from edgemoe.gguf_file import ModelFileChanged

            raise ModelFileChanged(f"the model file ended at byte {offset + done} while it was being copied; "
                                   "it was truncated meanwhile")
        fout.write(chunk)
        done += len(chunk)
