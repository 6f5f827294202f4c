"""In-place edits of one metadata value, tensor dim or tensor type of a GGUF file, for tests that
craft inconsistent files (offsets found with gguf-py's reader; the value keeps its width)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _write(path: Path, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(raw)


def _offset(reader, part: np.ndarray) -> int:
    return part.ctypes.data - reader.data.ctypes.data


def set_kv(path: Path, key: str, value, index: int = 0) -> None:
    """Scalar `key` (or item `index` of an array) = value, in the field's own numeric type."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    part = reader.fields[key].parts[reader.fields[key].data[index]]
    offset, raw = _offset(reader, part), np.array([value], dtype=part.dtype).tobytes()
    del reader
    _write(path, offset, raw)


def set_tensor_dims(path: Path, name: str, *ne: int) -> None:
    """The leading dims of tensor `name` in ggml order (ne[0]: the row length, numpy's last axis)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    info = next(t for t in reader.tensors if t.name == name)
    offset = _offset(reader, info.field.parts[3])
    del reader, info
    _write(path, offset, np.array(ne, dtype=np.uint64).tobytes())


def set_tensor_type(path: Path, name: str, qtype: int) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    info = next(t for t in reader.tensors if t.name == name)
    offset = _offset(reader, info.field.parts[4])
    del reader, info
    _write(path, offset, np.uint32(qtype).tobytes())


def set_string(path: Path, key: str, text: str) -> None:
    """String value of `key` = text, which must have the old value's byte length."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    part = reader.fields[key].parts[reader.fields[key].data[0]]
    offset, raw = _offset(reader, part), text.encode()
    if len(raw) != part.nbytes:
        raise ValueError(f"{key}: {text!r} is {len(raw)} bytes, the value it replaces {part.nbytes}")
    del reader, part
    _write(path, offset, raw)
