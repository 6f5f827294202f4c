"""Lazy, validated reading of a Hugging Face checkpoint folder (config.json + *.safetensors).

We parse safetensors headers ourselves and read each tensor with one pread, instead of
mmap-ing the files: pages of a long-lived mmap stay in the process's RSS, so a converter
that touched every tensor through one mmap would look (and, under memory pressure, act)
like it holds the whole model. pread keeps resident memory near one tensor.

FP8 checkpoints (e4m3 weights with block scales, converters/fp8.py) read as float32 like any
other: the scale tensors are consumed by their weights and do not appear in `tensors`.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.converters import fp8
from edgemoe.converters.errors import ConvertError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    fp8.FP8_DTYPE: np.uint8,  # bytes; values come from fp8.dequantize with the tensor's scales
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int


class HFCheckpoint:
    """A checkpoint folder; `config` is the parsed config.json, `tensors` an index by name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConvertError(f"{self.folder} is not a folder; pass the folder holding config.json and *.safetensors")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ConvertError(f"{self.folder} has no config.json; is it a Hugging Face checkpoint folder?")
        try:
            self.config: dict = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConvertError(f"{config_path} is not valid JSON: {exc}") from exc
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{self.folder} has no *.safetensors files (pytorch .bin checkpoints are not supported; "
                               "re-save with `model.save_pretrained(dir, safe_serialization=True)`)")
        self.tensors: dict[str, TensorEntry] = {}
        for file in files:
            for entry in read_safetensors_index(file):
                self.tensors[entry.name] = entry
        self.fp8_block = fp8.block_size(self.config, config_path)
        self._scales = self._take_fp8_scales() if self.fp8_block else {}

    def _take_fp8_scales(self) -> dict[str, TensorEntry]:
        """weight name -> its scale tensor, removed from `tensors` (with unused activation scales)."""
        scales = {name.removesuffix(fp8.SCALE_SUFFIX): self.tensors.pop(name)
                  for name in [n for n in self.tensors if n.endswith(fp8.SCALE_SUFFIX)]}
        for name in [n for n in self.tensors if fp8.is_unused(n)]:
            del self.tensors[name]
        for weight, scale in scales.items():
            if self.tensors.get(weight) is None or self.tensors[weight].dtype != fp8.FP8_DTYPE:
                raise ConvertError(f"{scale.file}: scale tensor {scale.name} belongs to no FP8 weight {weight!r}; "
                                   "the checkpoint is incomplete or inconsistent")
        return scales

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise ConvertError(f"{self.folder / 'config.json'} has no 'architectures' field")
        return archs[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def has(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor (or its `index`-th slice along axis 0) as float32; bf16/f16 widen exactly,
        FP8 is dequantized with its block scales."""
        entry = self._entry(name)
        if entry.dtype != fp8.FP8_DTYPE:
            return self._read(entry, index)
        if name not in self._scales:
            raise ConvertError(f"{entry.file}: tensor {name} is FP8 but the checkpoint has no {name}{fp8.SCALE_SUFFIX} "
                               "for it (or config.json lacks quantization_config); the checkpoint is incomplete")
        return fp8.dequantize(self._read(entry, index, raw=True), self._read(self._scales[name], index),
                              self.fp8_block, name)

    def _read(self, entry: TensorEntry, index: int | None, raw: bool = False) -> np.ndarray:
        name = entry.name
        shape, offset, nbytes = entry.shape, entry.offset, entry.nbytes
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{name}: slice {index} out of range 0..{shape[0] - 1}")
            nbytes //= shape[0]
            offset += index * nbytes
            shape = shape[1:]
        buf = np.empty(nbytes, dtype=np.uint8)
        with open(entry.file, "rb", buffering=0) as f:
            f.seek(offset)
            got = f.readinto(memoryview(buf))
        if got != nbytes:
            raise ConvertError(f"{entry.file}: tensor {name} is cut short ({got} of {nbytes} bytes); "
                               "the file is truncated, download it again")
        arr = buf.view(_DTYPES[entry.dtype]).reshape(shape)
        if raw:
            return arr
        if entry.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32, copy=False)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise ConvertError(f"{self.folder}: tensor {name!r} is missing from the checkpoint") from None


def read_safetensors_index(file: Path) -> list[TensorEntry]:
    """Parse and validate one safetensors header; a truncated or corrupt file raises ConvertError."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{file} is too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ConvertError(f"{file}: header length {header_len} does not fit the file ({size} bytes); "
                               "the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConvertError(f"{file}: corrupt safetensors header ({exc})") from exc
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConvertError(f"{file}: malformed header entry for {name!r}") from exc
        if dtype not in _DTYPES:
            raise ConvertError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != nbytes or begin < 0:
            raise ConvertError(f"{file}: tensor {name} offsets {begin}..{end} do not match shape {shape} {dtype}")
        if data_start + end > size:
            raise ConvertError(f"{file} is truncated: tensor {name} ends at byte {data_start + end} "
                               f"but the file has {size} bytes; download it again")
        entries.append(TensorEntry(name, file, dtype, shape, data_start + begin, nbytes))
    return entries
