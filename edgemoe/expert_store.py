"""Where each expert's bytes live in a GGUF file, and reading one expert with pread.

Stock layout: expert e of layer l is slice e of the 3-D tensors blk.l.ffn_{gate,up,down}_exps
(three preads). The extended layout (docs/FORMAT.md) stores each expert's three 2-D tensors
contiguously, each with its own type: one pread loads the expert. `find_experts` picks by layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.layout import ROLES, expert_tensor_name, is_extended, read_layout
from edgemoe.native.tensors import ALIGNMENT, Weight, aligned_empty

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
    contiguous: bool = False  # parts adjacent in the file, 32-byte aligned: one pread reads all

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    def layout(self) -> tuple[int, tuple[int, ...]]:
        """(buffer bytes, each part's position in the buffer): the file's own span when the parts
        are contiguous, else each part 64-byte aligned."""
        if self.contiguous:
            start, last = self.parts[0].offset, self.parts[-1]
            return last.offset + last.nbytes - start, tuple(p.offset - start for p in self.parts)
        positions, pos = [], 0
        for p in self.parts:
            positions.append(pos)
            pos += _round_up(p.nbytes)
        return pos, tuple(positions)

    @property
    def alloc_bytes(self) -> int:
        """Bytes a resident copy occupies (buffer rounded up, plus alignment slack): what the budget counts."""
        return _round_up(self.layout()[0]) + 64

    @property
    def nbytes(self) -> int:
        """The expert's bytes in the file."""
        return sum(p.nbytes for p in self.parts)


def find_experts(model: GGUFFile) -> dict[tuple[int, int], ExpertSpec]:
    """Every routed expert of `model`, keyed (layer, index in the layer's router), by layout."""
    return extended_experts(model) if is_extended(model) else stock_experts(model)


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


def extended_experts(model: GGUFFile) -> dict[tuple[int, int], ExpertSpec]:
    """Experts of the extended layout: per layer its own count, per expert its own types."""
    layout = read_layout(model)
    specs: dict[tuple[int, int], ExpertSpec] = {}
    for layer, n in enumerate(layout.expert_counts):
        for e in range(n):
            parts = []
            for role, qtype in zip(ROLES, layout.expert_types[(layer, e)]):
                name = expert_tensor_name(layer, e, role)
                t = model.tensors.get(name)
                if t is None:
                    raise ModelFileError(f"{model.path}: tensor {name} is missing ({layout.expert_counts[layer]} "
                                         f"experts listed for layer {layer}); re-convert the model")
                if len(t.shape) != 2 or t.qtype != qtype:
                    raise ModelFileError(f"{model.path}: {name} is {t.qtype.name} {list(t.shape)}; the expert type "
                                         f"table says a 2-D {qtype.name} matrix")
                parts.append(ExpertPart(role, t.qtype, t.shape[0], t.shape[1], t.offset, t.nbytes))
            specs[(layer, e)] = ExpertSpec(layer, e, tuple(parts), _contiguous(parts))
    return specs


def _contiguous(parts: list[ExpertPart]) -> bool:
    # file padding between tensors is < 64 bytes; every part must stay 32-byte aligned in the buffer
    for prev, p in zip(parts, parts[1:]):
        gap = p.offset - (prev.offset + prev.nbytes)
        if not 0 <= gap < 64 or (p.offset - parts[0].offset) % ALIGNMENT:
            return False
    return True


class ResidentExpert:
    """One expert's bytes in our own aligned memory, wrapped as ggml tensors (zero copy)."""

    def __init__(self, spec: ExpertSpec, buffer: np.ndarray):
        self.spec, self.buffer = spec, buffer
        self.weights: dict[str, Weight] = {}
        for p, pos in zip(spec.parts, spec.layout()[1]):
            self.weights[p.role] = Weight(buffer[pos:pos + p.nbytes], p.qtype, p.rows, p.cols,
                                          name=f"blk.{spec.layer}.expert{spec.expert}.{p.role}")

    def close(self) -> None:
        for w in self.weights.values():
            w.close()


def read_expert(fd: int, spec: ExpertSpec, file_size: int) -> ResidentExpert:
    """pread `spec` into one fresh aligned buffer: one read for a contiguous expert, else one per
    part (releases the GIL while reading)."""
    size, positions = spec.layout()
    buffer = aligned_empty(spec.alloc_bytes - 64)
    assert buffer.ctypes.data % ALIGNMENT == 0
    if spec.contiguous:
        _pread(fd, buffer[:size], spec.parts[0].offset, file_size, f"expert {spec.key}")
    else:
        for p, pos in zip(spec.parts, positions):
            _pread(fd, buffer[pos:pos + p.nbytes], p.offset, file_size, f"expert {spec.key} {p.role}")
    return ResidentExpert(spec, buffer)


def _pread(fd: int, into: np.ndarray, offset: int, file_size: int, what: str) -> None:
    if offset + into.nbytes > file_size:
        raise ModelFileError(f"{what} lies beyond the end of the model file; the file was truncated")
    view, got = memoryview(into), 0
    while got < into.nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ModelFileError(f"short read of {what}: {got} of {into.nbytes} bytes; "
                                 "the model file changed or was truncated while running")
        got += n
