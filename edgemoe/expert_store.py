"""Where each expert's bytes live in a GGUF file, and reading one expert with pread.

Stock layout: expert e of layer l is slice e of the 3-D tensors blk.l.ffn_{gate,up,down}_exps
(three preads). The extended layout (docs/FORMAT.md) stores each expert contiguously.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.native.tensors import ALIGNMENT, Weight, aligned_empty

ROLES = ("gate", "up", "down")
_STOCK = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}


def _round_up(n: int, align: int = 64) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class ExpertPart:
    role: str       # gate | up | down
    qtype: QT
    rows: int       # out features
    cols: int       # in features
    offset: int     # absolute file offset
    nbytes: int


@dataclass(frozen=True)
class ExpertSpec:
    layer: int
    expert: int
    parts: tuple[ExpertPart, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    @property
    def alloc_bytes(self) -> int:
        """Bytes a resident copy occupies (each part 64-byte aligned): what the budget counts."""
        return sum(_round_up(p.nbytes) for p in self.parts) + 64


def stock_experts(model: GGUFFile) -> dict[tuple[int, int], ExpertSpec]:
    specs: dict[tuple[int, int], ExpertSpec] = {}
    n_layers = int(model.arch_field("block_count", 0))
    for layer in range(n_layers):
        tensors = {role: model.tensors.get(f"blk.{layer}.{name}.weight") for role, name in _STOCK.items()}
        if not any(tensors.values()):
            continue  # a dense layer
        if not all(tensors.values()):
            raise ModelFileError(f"{model.path}: layer {layer} lacks some of the expert tensors {list(_STOCK.values())}")
        n_expert = tensors["gate"].shape[0]
        for e in range(n_expert):
            parts = []
            for role in ROLES:
                t = tensors[role]
                if len(t.shape) != 3 or t.shape[0] != n_expert:
                    raise ModelFileError(f"{model.path}: {t.name} has shape {t.shape}, expected [{n_expert}, rows, cols]")
                per = t.nbytes // n_expert
                parts.append(ExpertPart(role, t.qtype, t.shape[1], t.shape[2], t.offset + e * per, per))
            specs[(layer, e)] = ExpertSpec(layer, e, tuple(parts))
    return specs


class ResidentExpert:
    """One expert's bytes in our own aligned memory, wrapped as ggml tensors (zero copy)."""

    def __init__(self, spec: ExpertSpec, buffer: np.ndarray):
        self.spec, self.buffer = spec, buffer
        self.weights: dict[str, Weight] = {}
        pos = 0
        for p in spec.parts:
            self.weights[p.role] = Weight(buffer[pos:pos + p.nbytes], p.qtype, p.rows, p.cols,
                                          name=f"blk.{spec.layer}.expert{spec.expert}.{p.role}")
            pos += _round_up(p.nbytes)

    def close(self) -> None:
        for w in self.weights.values():
            w.close()


def read_expert(fd: int, spec: ExpertSpec, file_size: int) -> ResidentExpert:
    """pread every part of `spec` into one fresh aligned buffer (releases the GIL while reading)."""
    buffer = aligned_empty(spec.alloc_bytes - 64)
    assert buffer.ctypes.data % ALIGNMENT == 0
    pos = 0
    for p in spec.parts:
        if p.offset + p.nbytes > file_size:
            raise ModelFileError(f"expert {spec.key} {p.role} lies beyond the end of the model file; "
                                 "the file was truncated")
        view = memoryview(buffer[pos:pos + p.nbytes])
        got = 0
        while got < p.nbytes:
            n = os.preadv(fd, [view[got:]], p.offset + got)
            if n <= 0:
                raise ModelFileError(f"short read of expert {spec.key} {p.role}: {got} of {p.nbytes} bytes; "
                                     "the model file changed or was truncated while running")
            got += n
        pos += _round_up(p.nbytes)
    return ResidentExpert(spec, buffer)
