"""A validated, zero-copy view of a GGUF file.

Everything native code will later touch (tensor offsets, byte sizes, types) is checked here
against the real file size first, so a corrupt or truncated file is a clear Python error,
never a crash inside ggml.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

EDGEMOE_KEY_PREFIX = "edgemoe."


class ModelFileError(Exception):
    """A model file that is missing, unreadable, truncated or not a GGUF file."""


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
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # the reader raises ValueError/IndexError/KeyError on garbage
            raise ModelFileError(f"{self.path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                                 "re-create it with `edgemoe convert`") from exc
        self.tensors: dict[str, TensorInfo] = {}
        for t in self.reader.tensors:
            info = self._validated(t)
            self.tensors[info.name] = info

    def _validated(self, t) -> TensorInfo:
        try:
            qtype = QT(int(t.tensor_type))
        except ValueError:
            raise ModelFileError(f"{self.path}: tensor {t.name} has unknown type {int(t.tensor_type)}") from None
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if not shape or shape[-1] % block or any(d <= 0 for d in shape):
            raise ModelFileError(f"{self.path}: tensor {t.name} has invalid shape {shape} for {qtype.name}")
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_bytes
        offset = int(t.data_offset)
        if nbytes != int(t.n_bytes) or offset < 0 or offset + nbytes > self.size:
            raise ModelFileError(f"{self.path} is truncated or corrupt: tensor {t.name} needs bytes "
                                 f"{offset}..{offset + nbytes} but the file has {self.size}; re-create it")
        return TensorInfo(t.name, shape, qtype, offset, nbytes)

    def field(self, key: str, default=None):
        f = self.reader.get_field(key)
        if f is None:
            return default
        return f.contents()

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
