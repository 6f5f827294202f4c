"""A validated, zero-copy view of a GGUF file.

Everything native code will later touch (tensor offsets, byte sizes, types) is checked here
against the real file size first, so a corrupt or truncated file is a clear Python error,
never a crash inside ggml.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.errors import EdgemoeError
from edgemoe.gguf_header import ARRAY, STRING, HeaderError, RawTensor, array_values, read_header

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
        try:
            header = read_header(self.path, self.size)
        except HeaderError as exc:
            raise ModelFileError(f"{self.path} is truncated or corrupt: {exc}; re-create it with `edgemoe convert`") from None
        self.fields, self.alignment = header.fields, header.alignment
        # the whole file, mapped read-only (page-aligned): tensor bytes and array items are read from it
        self.mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors: dict[str, TensorInfo] = _Tensors(self.path)
        for t in header.tensors:
            info = self._validated(t)
            self.tensors[info.name] = info
        self._check_vocab()
        self._check_layer_count()

    def _validated(self, t: RawTensor) -> TensorInfo:
        try:
            qtype = QT(t.ggml_type)
        except ValueError:
            raise ModelFileError(f"{self.path}: tensor {t.name} has unknown type {t.ggml_type}") from None
        if qtype in _SIZE_DISAGREES or qtype not in gguf.GGML_QUANT_SIZES:
            raise ModelFileError(f"{self.path}: tensor {t.name} has type {qtype.name}, which edgemoe cannot read "
                                 "(not a weight type); the file is corrupt or not for this engine")
        shape = tuple(reversed(t.dims))
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if not shape or shape[-1] % block or any(d <= 0 for d in shape):
            raise ModelFileError(f"{self.path}: tensor {t.name} has invalid shape {shape} for {qtype.name}")
        nbytes = math.prod(shape) // block * type_bytes
        offset = t.offset
        if offset + nbytes > self.size:
            raise ModelFileError(f"{self.path} is truncated or corrupt: tensor {t.name} needs bytes "
                                 f"{offset}..{offset + nbytes} but the file has {self.size}; re-create it")
        if offset % TENSOR_ALIGNMENT:
            # ggml wraps tensor bytes in place (a memmap is page-aligned, so file offset = address alignment)
            raise ModelFileError(f"{self.path}: tensor {t.name} starts at offset {offset}, not a multiple of "
                                 f"{TENSOR_ALIGNMENT} (general.alignment {self.alignment}); re-create the "
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
        f = self.fields.get(VOCAB_KEY)
        if f is None:
            return
        if f.vtype != ARRAY or f.sub_type != STRING:
            raise ModelFileError(f"{self.path}: {VOCAB_KEY} is not an array of strings; re-create the file")
        seen: dict[bytes, int] = {}
        for i, raw in enumerate(array_values(self.mapped, f)):
            token = raw.split(b"\0", 1)[0]
            if seen.setdefault(token, i) != i:
                raise ModelFileError(f"{self.path}: {VOCAB_KEY} holds token {token!r} twice (ids {seen[token]} and "
                                     f"{i}); the vocabulary is corrupt, re-create the file")

    def field(self, key: str, default=None):
        """A metadata value: int, float, bool, str, or a list of them (arrays are decoded on each call)."""
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            if f.vtype == STRING:
                return f.value.decode("utf-8")
            if f.vtype == ARRAY:
                items = array_values(self.mapped, f)
                return [b.decode("utf-8") for b in items] if f.sub_type == STRING else items
            return f.value
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"{self.path}: metadata {key!r} is corrupt ({exc}); re-create the file") from None

    def raw_field(self, key: str):
        """A metadata value as stored: strings as bytes, arrays as lists (of bytes for strings)."""
        f = self.fields[key]
        return array_values(self.mapped, f) if f.vtype == ARRAY else f.value

    def array_length(self, key: str) -> int | None:
        f = self.fields.get(key)
        return f.count if f is not None and f.vtype == ARRAY else None

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
        return list(self.fields)

    def data(self, name: str) -> np.ndarray:
        """Raw bytes of a tensor as a read-only memmap slice (no copy)."""
        info = self.tensors[name]
        return self.mapped[info.offset:info.offset + info.nbytes]
