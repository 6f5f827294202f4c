"""A GGUF file's header, key/value pairs and tensor infos, walked once with every count and
length checked against the bytes left in the file.

Arrays are not decoded at open: a field holds where its items start and how many there are, and
`array_values` decodes them when someone asks. gguf-py's GGUFReader keeps one numpy memmap view
per array item instead: on a file with Qwen's 151,936-token vocabulary (tokens, token types) that
is ~455,000 views and 312 MiB of anonymous memory for the process's whole life, a tenth of a
3 GiB laptop cap taken from the expert budget, and an absurd declared count would make it loop
(allocating) for ever.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import EdgemoeError

# GGUF value types (gguf.GGUFValueType) -> numpy dtype of a scalar; 8 = string, 9 = array
SCALAR_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"


class HeaderError(EdgemoeError):
    """What is wrong with the header, for GGUFFile to name the file and the fix."""


@dataclass(frozen=True)
class Field:
    """One key/value pair. Scalars are decoded (Python int, float or bool); a string is its raw
    bytes; an array is `count` items of `sub_type` starting at byte `at` (decode with
    `array_values`)."""
    vtype: int
    value: object = None
    sub_type: int | None = None
    at: int = 0
    count: int = 0


@dataclass(frozen=True)
class RawTensor:
    name: str
    dims: tuple[int, ...]  # as stored: innermost first
    ggml_type: int
    offset: int            # absolute byte offset in the file


@dataclass(frozen=True)
class Header:
    fields: dict[str, Field]
    tensors: list[RawTensor]
    alignment: int


def read_header(path: Path, size: int) -> Header:
    """Walk a file that starts with the GGUF magic (GGUFFile checks it first, with its own
    message); HeaderError on anything truncated, absurd or of an unknown type."""
    if size < 24:
        raise HeaderError(f"{size} bytes, a GGUF header alone is 24")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return _Walk(m, size).header()


class _Walk:
    def __init__(self, m, size: int):
        self.m, self.size, self.pos = m, size, 0

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise HeaderError(f"{what} at offset {self.pos} needs {n} bytes, "
                              f"the file has {self.size - self.pos} left")
        at, self.pos = self.pos, self.pos + n
        return at

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.m, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.m, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(what + " length")
        at = self.take(n, what)
        return self.m[at:at + n]

    def scalar(self, vtype: int, what: str):
        dtype = np.dtype(SCALAR_DTYPES[vtype])
        return np.frombuffer(self.m, dtype, 1, self.take(dtype.itemsize, what))[0].item()

    def value(self, vtype: int, what: str) -> Field:
        if vtype in SCALAR_DTYPES:
            return Field(vtype, self.scalar(vtype, what))
        if vtype == STRING:
            return Field(vtype, self.string(what))
        if vtype != ARRAY:
            raise HeaderError(f"{what} has unknown value type {vtype}")
        itype, count = self.u32(what + " item type"), self.u64(what + " length")
        at = self.pos
        if itype in SCALAR_DTYPES:
            self.take(count * np.dtype(SCALAR_DTYPES[itype]).itemsize, what)
        elif itype == STRING:
            if count * 8 > self.size - self.pos:  # each item is at least its u64 length
                self.take(count * 8, what)
            for _ in range(count):
                self.take(self.u64(what + " item length"), what)
        elif itype == ARRAY:
            raise HeaderError(f"{what} is an array of arrays, which no model file holds")
        else:
            raise HeaderError(f"{what} has unknown item type {itype}")
        return Field(vtype, None, itype, at, count)

    def header(self) -> Header:
        version = struct.unpack_from("<I", self.m, 4)[0]
        if version not in (2, 3):
            raise HeaderError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", self.m, 8)
        self.pos = 24
        fields: dict[str, Field] = {}
        for i in range(n_kv):
            key = _text(self.string(f"key {i}"), f"key {i}")
            if key in fields:
                raise HeaderError(f"metadata key {key!r} appears twice")
            fields[key] = self.value(self.u32(f"key {key!r} type"), f"the value of {key!r}")
        if n_tensors * 24 > self.size - self.pos:  # name length, dimensions, type, offset at least
            self.take(n_tensors * 24, "tensor infos")
        infos, names = [], set()  # (name, dims, type, offset from the data section's start)
        for i in range(n_tensors):
            name = _text(self.string(f"tensor info {i} name"), f"tensor info {i} name")
            n_dims = self.u32(f"tensor {name} dimensions")
            if not 1 <= n_dims <= MAX_DIMS:
                raise HeaderError(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS})")
            dims = struct.unpack_from(f"<{n_dims}Q", self.m, self.take(8 * n_dims, f"tensor {name} dimensions"))
            ggml_type, offset = self.u32(f"tensor {name} type"), self.u64(f"tensor {name} offset")
            if name in names:
                raise HeaderError(f"tensor {name!r} appears twice")
            names.add(name)
            infos.append((name, tuple(dims), ggml_type, offset))
        alignment = _alignment(fields.get(ALIGNMENT_KEY))
        data_start = -(-self.pos // alignment) * alignment
        return Header(fields, [RawTensor(name, dims, ggml_type, data_start + offset)
                               for name, dims, ggml_type, offset in infos], alignment)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"{what} is not UTF-8 text") from None


def _alignment(field: Field | None) -> int:
    """general.alignment: a u32 power of two. llama.cpp refuses another value and aborts the
    process on another type (its u32 getter asserts)."""
    if field is None:
        return DEFAULT_ALIGNMENT
    if field.vtype != 4:
        raise HeaderError(f"{ALIGNMENT_KEY} has value type {field.vtype}, not uint32 (4)")
    value = int(field.value)
    if value <= 0 or value & (value - 1):
        raise HeaderError(f"{ALIGNMENT_KEY} = {value} is not a power of two")
    return value


def array_values(data, field: Field) -> list:
    """An array field's items as Python values (strings as raw bytes), read from `data` (the
    file's bytes, mapped)."""
    if field.sub_type in SCALAR_DTYPES:
        return np.frombuffer(data, SCALAR_DTYPES[field.sub_type], field.count, field.at).tolist()
    view, out, pos = memoryview(data), [], field.at
    for _ in range(field.count):
        n = struct.unpack_from("<Q", view, pos)[0]
        out.append(bytes(view[pos + 8:pos + 8 + n]))
        pos += 8 + n
    return out
