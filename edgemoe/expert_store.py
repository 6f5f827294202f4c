"""Where each expert's bytes live in a GGUF file, and reading one expert with pread.

Stock layout: expert e of layer l is slice e of the 3-D tensors blk.l.ffn_{gate,up,down}_exps
(three preads). The extended layout (docs/FORMAT.md) stores each expert's three 2-D tensors
contiguously, each with its own type: one pread loads the expert. `find_experts` picks by layout.
A low-rank matrix (layout version 2) is two parts, `{role}_a` [r, in] then `{role}_b` [out, r]
(W ~= B·A), read in the same pread; `ResidentExpert.matrices` gives each role as a `Weight` or a
`LowRank` pair.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.layout import ROLES, expert_tensor_name, is_extended, read_layout
from edgemoe.native.buffers import ALIGNMENT
from edgemoe.native.tensors import Weight, aligned_empty

_STOCK = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
PAGE_BYTES = mmap.PAGESIZE  # a resident copy is whole pages (ExpertSpec.alloc_bytes)
CONGRUENT_MIN_BYTES = 256 * 1024  # parts this big are laid out for in-place O_DIRECT (ExpertSpec.layout)


def _round_up(n: int, align: int = 64) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class ExpertPart:
    role: str       # gate | up | down, or gate_a | gate_b | ... for low-rank factors
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
    # a stock 3-D tensor's expert: big parts sit in the buffer where their file offset falls in a
    # page (layout()), so O_DIRECT reads them in place instead of through a bounce buffer and a copy
    congruent: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)

    def layout(self) -> tuple[int, tuple[int, ...]]:
        """(buffer bytes, each part's position in the buffer): the file's own span when the parts
        are contiguous, else each part 64-byte aligned, except that a congruent spec's big parts
        sit at their file offset modulo the page (32-byte aligned, as GGUF offsets are: what ggml
        needs). That costs under a page per part, under 1.6% at CONGRUENT_MIN_BYTES, and it keeps
        every expert of a stock tensor at the same positions (one arena) only because their stride,
        the part's size, is whole pages; so parts of other sizes keep the plain rule."""
        if self.contiguous:
            start, last = self.parts[0].offset, self.parts[-1]
            return last.offset + last.nbytes - start, tuple(p.offset - start for p in self.parts)
        positions, pos = [], 0
        for p in self.parts:
            pos = _round_up(pos)
            if self.congruent and p.nbytes >= CONGRUENT_MIN_BYTES and p.nbytes % PAGE_BYTES == 0:
                pos += (p.offset - pos) % PAGE_BYTES
            positions.append(pos)
            pos += p.nbytes
        return _round_up(pos), tuple(positions)

    @property
    def alloc_bytes(self) -> int:
        """Bytes a resident copy occupies, what the budget counts: its buffer rounded up to whole
        pages (an arena frame, edgemoe/arenas.py; page-rounded so an evicted frame's memory can
        be given back to the system)."""
        return _round_up(self.layout()[0], PAGE_BYTES)

    @property
    def nbytes(self) -> int:
        """The expert's bytes in the file."""
        return sum(p.nbytes for p in self.parts)


def find_experts(model: GGUFFile) -> dict[tuple[int, int], ExpertSpec]:
    """Every routed expert of `model`, keyed (layer, index in the layer's router), by layout."""
    return extended_experts(model) if is_extended(model) else stock_experts(model)


def stock_experts(model: GGUFFile) -> dict[tuple[int, int], ExpertSpec]:
    from edgemoe.legacy import check_current_layout

    check_current_layout(model)  # per-expert 2-D tensors would read as dense layers
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
            specs[(layer, e)] = ExpertSpec(layer, e, tuple(parts), congruent=True)
    return specs


def extended_experts(model: GGUFFile) -> dict[tuple[int, int], ExpertSpec]:
    """Experts of the extended layout: per layer its own count, per expert its own types and
    (version 2) low-rank roles, every shape checked against the others before native code."""
    layout = read_layout(model)
    # an expert's FFN width: the hyper-parameter where the arch writes one, else the layer's first expert
    hidden, expert_ffn = (model.arch_field(k) for k in ("embedding_length", "expert_feed_forward_length"))
    expert_ffn = expert_ffn if expert_ffn is not None else model.arch_field("feed_forward_length")
    if not all(isinstance(v, (int, type(None))) for v in (hidden, expert_ffn)):
        raise ModelFileError(f"{model.path}: {model.arch}.embedding_length / feed-forward length is not an integer")
    hidden = hidden or 0
    specs: dict[tuple[int, int], ExpertSpec] = {}
    for layer, n in enumerate(layout.expert_counts):
        layer_ffn = int(expert_ffn) if expert_ffn else None
        for e in range(n):
            parts: list[ExpertPart] = []
            for role, qtype, rank in zip(ROLES, layout.expert_types[(layer, e)], layout.expert_ranks[(layer, e)]):
                parts.extend(_role_parts(model, layer, e, role, qtype, rank))
            ffn = _check_shapes(model, layer, e, parts, hidden, layer_ffn)
            layer_ffn = layer_ffn or ffn
            specs[(layer, e)] = ExpertSpec(layer, e, tuple(parts), _contiguous(parts))
    return specs


def _role_parts(model: GGUFFile, layer: int, e: int, role: str, qtype: QT, rank: int) -> list[ExpertPart]:
    """One matrix of one expert: the full tensor (rank 0), or its factors a [rank, in], b [out, rank]
    (a in the type table's type, b in its own, the type's fallback for rows of `rank` values)."""
    full = expert_tensor_name(layer, e, role)
    if rank == 0:
        t = model.tensors.get(full)
        if t is None:
            raise ModelFileError(f"{model.path}: tensor {full} is missing (layer {layer} lists {e + 1}+ experts "
                                 "and edgemoe.expert_ranks says full rank); re-convert the model")
        if len(t.shape) != 2 or t.qtype != qtype:
            raise ModelFileError(f"{model.path}: {full} is {t.qtype.name} {list(t.shape)}; the expert type "
                                 f"table says a 2-D {qtype.name} matrix")
        return [ExpertPart(role, t.qtype, t.shape[0], t.shape[1], t.offset, t.nbytes)]
    if full in model.tensors:
        raise ModelFileError(f"{model.path}: {full} is stored in full, but edgemoe.expert_ranks gives it rank {rank}")
    a, b = (model.tensors.get(expert_tensor_name(layer, e, role, f)) for f in ("a", "b"))
    for f, t in (("a", a), ("b", b)):
        if t is None:
            raise ModelFileError(f"{model.path}: low-rank factor {expert_tensor_name(layer, e, role, f)} is missing "
                                 f"(edgemoe.expert_ranks gives layer {layer} expert {e} {role} rank {rank}); "
                                 "re-export the model")
        if len(t.shape) != 2:
            raise ModelFileError(f"{model.path}: {t.name} has shape {list(t.shape)}; a factor is a 2-D matrix")
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ModelFileError(f"{model.path}: {a.name} {list(a.shape)} and {b.name} {list(b.shape)} do not have "
                             f"the rank {rank} edgemoe.expert_ranks gives (expected [{rank}, in] and [out, {rank}])")
    if a.qtype != qtype:
        raise ModelFileError(f"{model.path}: {a.name} is {a.qtype.name}; the expert type table says {qtype.name}")
    return [ExpertPart(role + "_a", a.qtype, a.shape[0], a.shape[1], a.offset, a.nbytes),
            ExpertPart(role + "_b", b.qtype, b.shape[0], b.shape[1], b.offset, b.nbytes)]


def _check_shapes(model: GGUFFile, layer: int, e: int, parts: list[ExpertPart], hidden: int,
                  layer_ffn: int | None) -> int:
    """gate/up map hidden -> F, down maps F -> hidden, with one F per layer; returns F."""
    dims = {}  # role -> (out, in) of the whole matrix
    for p in parts:
        role, _, factor = p.role.partition("_")
        out, inp = dims.get(role, (None, None))
        dims[role] = (p.rows if factor != "a" else out, p.cols if factor != "b" else inp)
    ffn = layer_ffn or dims["gate"][0]
    want = {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    for role in ROLES:
        if dims[role] != want[role]:
            raise ModelFileError(f"{model.path}: layer {layer} expert {e} {role} is {list(dims[role])} (out, in); "
                                 f"expected {list(want[role])} (hidden size {hidden}, expert FFN size {ffn})")
    return ffn


def _contiguous(parts: list[ExpertPart]) -> bool:
    # file padding between tensors is < 64 bytes; every part must stay 32-byte aligned in the buffer
    for prev, p in zip(parts, parts[1:]):
        gap = p.offset - (prev.offset + prev.nbytes)
        if not 0 <= gap < 64 or (p.offset - parts[0].offset) % ALIGNMENT:
            return False
    return True


@dataclass(frozen=True)
class LowRank:
    """A low-rank expert matrix W ~= b @ a: x -> a -> b, two ggml matmuls. a [r, in], b [out, r]."""
    a: Weight
    b: Weight

    @property
    def rows(self) -> int:
        return self.b.rows


class ResidentExpert:
    """One expert's bytes in our own aligned memory, wrapped as ggml tensors (zero copy)."""

    def __init__(self, spec: ExpertSpec, buffer: np.ndarray):
        self.spec, self.buffer = spec, buffer
        self.weights: dict[str, Weight] = {}  # part role (gate, gate_a, ...) -> its matrix
        for p, pos in zip(spec.parts, spec.layout()[1]):
            self.weights[p.role] = Weight(buffer[pos:pos + p.nbytes], p.qtype, p.rows, p.cols,
                                          name=f"blk.{spec.layer}.expert{spec.expert}.{p.role}")
        # gate / up / down: the full matrix, or its two factors
        self.matrices: dict[str, Weight | LowRank] = {
            role: self.weights[role] if role in self.weights else LowRank(self.weights[role + "_a"],
                                                                         self.weights[role + "_b"])
            for role in ROLES}

    def close(self) -> None:
        for w in self.weights.values():
            w.close()


def expert_buffer(spec: ExpertSpec) -> np.ndarray:
    """Fresh aligned memory for one resident copy of `spec` (its parts at `spec.layout()`)."""
    buffer = aligned_empty(spec.layout()[0])
    assert buffer.ctypes.data % ALIGNMENT == 0
    return buffer


def read_expert(fd: int, spec: ExpertSpec, file_size: int) -> ResidentExpert:
    """pread `spec` into one fresh aligned buffer, in this thread: one read for a contiguous
    expert, else one per part (tools and probes; the caches read through ExpertLoader)."""
    size, positions = spec.layout()
    buffer = expert_buffer(spec)
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
