"""A validated, zero-copy view of a GGUF file.

Everything native code will later touch (tensor offsets, byte sizes, types) is checked here
against the real file size first, so a corrupt or truncated file is a clear Python error,
never a crash inside ggml.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.errors import EdgemoeError

EDGEMOE_KEY_PREFIX = "edgemoe."
VOCAB_KEY = "tokenizer.ggml.tokens"
# gguf-py 0.19 sizes Q8_1 blocks at 40 bytes, ggml at 36: its byte counts cannot be trusted. It is
# an activation type that no converter writes for weights.
_SIZE_DISAGREES = {QT.Q8_1}
TENSOR_ALIGNMENT = 32  # ggml_backend_cpu_buffer_from_ptr's requirement (edgemoe.native.buffers.ALIGNMENT)


class ModelFileError(EdgemoeError):
    """A model file that is missing, unreadable, truncated or not a GGUF file."""


class ModelFileChanged(ModelFileError):
    """The model file was truncated or rewritten while an engine had it open: that engine is done
    (its dense weights are mapped from the file); open the model again."""


class ExpertReadError(ModelFileError):
    """Reading an expert's bytes failed (an I/O error): that step is lost, the engine stays usable."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), e.g. experts [E, F, D]
    qtype: QT
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def layer(self) -> int | None:
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else None

    @property
    def is_expert(self) -> bool:
        return "_exps" in self.name or self.name.split(".")[2:3] == ["expert"]


class _Tensors(dict):
    """name -> TensorInfo; a missing name is a ModelFileError that names the file."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __missing__(self, name: str):
        raise ModelFileError(f"{self.path} lacks tensor {name!r}; the file is incomplete or not for this "
                             "architecture, re-create it with `edgemoe convert`")


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file {self.path} does not exist")
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head != b"GGUF":
            raise ModelFileError(f"{self.path} is not a GGUF file (starts with {head!r}); "
                                 "convert a checkpoint with `edgemoe convert`")
        _check_structure(self.path, self.size)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # the reader raises ValueError/IndexError/KeyError on garbage
            raise ModelFileError(f"{self.path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                                 "re-create it with `edgemoe convert`") from exc
        self.tensors: dict[str, TensorInfo] = _Tensors(self.path)
        for t in self.reader.tensors:
            info = self._validated(t)
            self.tensors[info.name] = info
        self._check_vocab()
        self._check_layer_count()

    def _validated(self, t) -> TensorInfo:
        try:
            qtype = QT(int(t.tensor_type))
        except ValueError:
            raise ModelFileError(f"{self.path}: tensor {t.name} has unknown type {int(t.tensor_type)}") from None
        if qtype in _SIZE_DISAGREES:
            raise ModelFileError(f"{self.path}: tensor {t.name} has type {qtype.name}, which edgemoe cannot read "
                                 "(not a weight type); the file is corrupt or not for this engine")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if not shape or shape[-1] % block or any(d <= 0 for d in shape):
            raise ModelFileError(f"{self.path}: tensor {t.name} has invalid shape {shape} for {qtype.name}")
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_bytes
        offset = int(t.data_offset)
        if nbytes != int(t.n_bytes) or offset < 0 or offset + nbytes > self.size:
            raise ModelFileError(f"{self.path} is truncated or corrupt: tensor {t.name} needs bytes "
                                 f"{offset}..{offset + nbytes} but the file has {self.size}; re-create it")
        if offset % TENSOR_ALIGNMENT:
            # ggml wraps tensor bytes in place (a memmap is page-aligned, so file offset = address alignment)
            raise ModelFileError(f"{self.path}: tensor {t.name} starts at offset {offset}, not a multiple of "
                                 f"{TENSOR_ALIGNMENT} (general.alignment {self.reader.alignment}); re-create the "
                                 "file with `edgemoe convert`")
        return TensorInfo(t.name, shape, qtype, offset, nbytes)

    def _check_layer_count(self) -> None:
        """Readers loop over `{arch}.block_count` layers: a count past the file's last `blk.N`
        tensor (a corrupt value such as 2^31) would loop for minutes instead of failing."""
        arch = self.field("general.architecture")
        count = self.field(f"{arch}.block_count") if isinstance(arch, str) else None
        if count is None:
            return
        layers = 1 + max((info.layer for info in self.tensors.values() if info.layer is not None), default=-1)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= layers:
            raise ModelFileError(f"{self.path}: {arch}.block_count = {count!r}, but its tensors hold {layers} layers; "
                                 "the file is corrupt, re-create it with `edgemoe convert`")

    def _check_vocab(self) -> None:
        """llama.cpp aborts the process (GGML_ASSERT, no exception) on a vocabulary with two equal
        tokens, where a token is read as a C string (up to its first NUL byte): refuse it here."""
        f = self.reader.get_field(VOCAB_KEY)
        if f is None:
            return
        if f.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
            raise ModelFileError(f"{self.path}: {VOCAB_KEY} is not an array of strings; re-create the file")
        seen: dict[bytes, int] = {}
        for i, part in enumerate(f.data):
            token = f.parts[part].tobytes().split(b"\0", 1)[0]
            if seen.setdefault(token, i) != i:
                raise ModelFileError(f"{self.path}: {VOCAB_KEY} holds token {token!r} twice (ids {seen[token]} and "
                                     f"{i}); the vocabulary is corrupt, re-create the file")

    def field(self, key: str, default=None):
        f = self.reader.get_field(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise ModelFileError(f"{self.path}: metadata {key!r} is corrupt ({exc}); re-create the file") from None

    def require(self, key: str):
        value = self.field(key)
        if value is None:
            raise ModelFileError(f"{self.path} lacks metadata key {key!r}")
        return value

    @property
    def arch(self) -> str:
        return self.require("general.architecture")

    def arch_field(self, name: str, default=None):
        return self.field(f"{self.arch}.{name}", default)

    def keys(self) -> list[str]:
        return list(self.reader.fields)

    def data(self, name: str) -> np.ndarray:
        """Raw bytes of a tensor as a read-only memmap slice (no copy)."""
        info = self.tensors[name]
        return self.reader.data[info.offset:info.offset + info.nbytes]


# GGUF value types (gguf.GGUFValueType) -> byte size of a scalar; 8 = string, 9 = array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


def _check_structure(path: Path, size: int) -> None:
    """Walk the header, key/value pairs and tensor infos, checking every count and length against
    the bytes left in the file, before gguf.GGUFReader parses them: that reader loops once per
    declared array item (an absurd count would run for ever, allocating as it goes)."""
    if size < 24:
        raise ModelFileError(f"{path} is truncated: {size} bytes, a GGUF header alone is 24; re-create it")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n > size - pos:
                raise ModelFileError(f"{path} is truncated or corrupt: {what} at offset {pos} needs {n} bytes, "
                                     f"the file has {size - pos} left; re-create it with `edgemoe convert`")
            at, pos = pos, pos + n
            return at

        def u32(what: str) -> int:
            return struct.unpack_from("<I", m, take(4, what))[0]

        def u64(what: str) -> int:
            return struct.unpack_from("<Q", m, take(8, what))[0]

        def string(what: str) -> str:
            n = u64(what + " length")
            at = take(n, what)
            return m[at:at + min(n, 200)].decode("utf-8", "replace")

        def value(vtype: int, what: str, depth: int = 0) -> None:
            if vtype in _SCALAR_BYTES:
                take(_SCALAR_BYTES[vtype], what)
            elif vtype == _STRING:
                string(what)
            elif vtype == _ARRAY and depth == 0:
                itype, count = u32(what + " item type"), u64(what + " length")
                if itype in _SCALAR_BYTES:
                    take(count * _SCALAR_BYTES[itype], what)
                    return
                if itype not in (_STRING, _ARRAY):
                    raise ModelFileError(f"{path}: {what} has unknown item type {itype}; the file is corrupt")
                if count * 8 > size - pos:  # each item is at least a u64 length (or type + length)
                    take(count * 8, what)
                for _ in range(count):
                    value(itype, what, depth + 1)
            elif vtype == _ARRAY:
                raise ModelFileError(f"{path}: {what} is an array of arrays, which no model file holds; "
                                     "the file is corrupt")
            else:
                raise ModelFileError(f"{path}: {what} has unknown value type {vtype}; the file is corrupt")

        version = struct.unpack_from("<I", m, 4)[0]
        if version not in (2, 3):
            raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 or 3); re-create the file")
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        pos = 24
        for i in range(n_kv):
            key = string(f"key {i}")
            value(u32(f"key {key!r} type"), f"the value of {key!r}")
        for i in range(n_tensors):
            string(f"tensor info {i} name")
            n_dims = u32(f"tensor info {i} dimensions")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ModelFileError(f"{path}: tensor info {i} has {n_dims} dimensions (1..{_MAX_DIMS}); "
                                     "the file is corrupt")
            take(8 * n_dims + 4 + 8, f"tensor info {i}")
