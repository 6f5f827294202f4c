"""Writing edgemoe's extended GGUF layout (docs/FORMAT.md, names in `edgemoe.layout`): the stock
layout's metadata and dense tensors, and one 2-D tensor set per expert with its own type,
gate/up/down written back to back so one pread loads an expert.

Streams like `convert`: each expert matrix is read from the checkpoint, quantized and appended.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch import ArchConverter, PlannedTensor
from edgemoe.converters.arch.base import Loader
from edgemoe.converters.convert import ProgressFn, write_gguf
from edgemoe.converters.errors import ConvertError
from edgemoe.converters.types import choose_type, parse_output_type
from edgemoe.converters.vocab import write_vocab
from edgemoe.layout import KEY_COUNTS, KEY_IDS, KEY_TYPES, KEY_VERSION, LAYOUT_VERSION, ROLES, expert_tensor_name
from edgemoe.native.quant import row_bytes

Key = tuple[int, int]
_ROLE_OF = {T.FFN_GATE_EXP: "gate", T.FFN_UP_EXP: "up", T.FFN_DOWN_EXP: "down"}


@dataclass(frozen=True)
class ExpertSource:
    """One expert's matrices in the checkpoint, in GGUF orientation: role -> [rows=out, cols=in]."""
    layer: int
    expert: int
    loaders: dict[str, Loader]
    shapes: dict[str, tuple[int, int]]

    def load(self, role: str) -> np.ndarray:
        return self.loaders[role]().reshape(self.shapes[role])

    @property
    def n_params(self) -> int:
        return sum(r * c for r, c in self.shapes.values())

    def types(self, qtype: QT) -> tuple[QT, QT, QT]:
        """gate, up, down types for `qtype`: the nearest fallback where a row does not fit its blocks."""
        return tuple(choose_type(qtype, self.shapes[role][1]) for role in ROLES)

    def nbytes(self, types: tuple[QT, QT, QT]) -> int:
        return sum(self.shapes[role][0] * row_bytes(t, self.shapes[role][1]) for role, t in zip(ROLES, types))


def split_plan(plan: list[PlannedTensor]) -> tuple[list[PlannedTensor], dict[Key, ExpertSource]]:
    """A converter's plan -> its dense tensors, and its 3-D expert tensors as per-expert sources."""
    dense, parts = [], {}
    for t in plan:
        if not t.expert_tensor:
            dense.append(t)
            continue
        role = next((r for kind, r in _ROLE_OF.items()
                     if t.name == gguf.TENSOR_NAMES[kind].format(bid=t.layer) + ".weight"), None)
        if role is None or len(t.shape) != 3 or len(t.parts) != t.shape[0] or t.raw_qtype is not None:
            raise ConvertError(f"expert tensor {t.name} cannot be split per expert (shape {t.shape})")
        for e, load in enumerate(t.parts):
            loaders, shapes = parts.setdefault((t.layer, e), ({}, {}))
            loaders[role], shapes[role] = load, t.shape[1:]
    experts = {}
    for (layer, e), (loaders, shapes) in sorted(parts.items()):
        if set(loaders) != set(ROLES):
            raise ConvertError(f"layer {layer} expert {e} lacks some of {ROLES}")
        experts[(layer, e)] = ExpertSource(layer, e, loaders, shapes)
    return dense, experts


@dataclass(frozen=True)
class ExtendedReport:
    path: Path
    n_tensors: int
    total_bytes: int
    expert_bytes: int
    types: dict[Key, tuple[QT, QT, QT]]
    fallbacks: dict[str, str] = field(default_factory=dict)


def write_extended(conv: ArchConverter, out: Path, dense_type: str, expert_types: dict[Key, QT],
                   imatrix: dict[Key, dict[str, np.ndarray]] | None = None, extra_kv: dict | None = None,
                   on_progress: ProgressFn | None = None) -> ExtendedReport:
    """Write `conv`'s checkpoint to `out` in the extended layout: dense tensors in `dense_type`,
    expert (layer, e) in expert_types[(layer, e)] with its importance matrices (role -> [cols])."""
    requested, file_type = parse_output_type(dense_type)
    dense, experts = split_plan(conv.plan())
    if set(expert_types) != set(experts):
        raise ConvertError(f"expert types given for {len(expert_types)} experts; the checkpoint has {len(experts)}")
    n_layers = conv.n_layers
    counts = [0] * n_layers
    for layer, e in experts:
        counts[layer] += 1
    for layer, n in enumerate(counts):
        if any((layer, e) not in experts for e in range(n)):
            raise ConvertError(f"layer {layer}: expert ids are not 0..{n - 1}")
    types = {k: experts[k].types(q) for k, q in expert_types.items()}

    w = gguf.GGUFWriter(path=None, arch=conv.arch_name)
    w.add_name(conv.ckpt.folder.resolve().name)
    conv.write_hparams(w)
    w.add_file_type(int(file_type))  # the dense tensors' type; experts vary (edgemoe.expert_types)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, conv.ckpt.folder, int(conv.ckpt.config["vocab_size"]))
    keys = sorted(experts)
    w.add_uint32(KEY_VERSION, LAYOUT_VERSION)
    w.add_key_value(KEY_COUNTS, counts, VT.ARRAY, sub_type=VT.UINT32)
    w.add_key_value(KEY_IDS, [e for _, e in keys], VT.ARRAY, sub_type=VT.UINT32)  # identity until pruning
    w.add_key_value(KEY_TYPES, [int(t) for k in keys for t in types[k]], VT.ARRAY, sub_type=VT.UINT32)
    for key, value in (extra_kv or {}).items():
        _add_value(w, key, value)

    plan = list(dense)
    for layer, e in keys:  # gate, up, down of one expert back to back
        src = experts[(layer, e)]
        for role, qtype in zip(ROLES, types[(layer, e)]):
            im = (imatrix or {}).get((layer, e), {}).get(role)
            plan.append(PlannedTensor(expert_tensor_name(layer, e, role), src.shapes[role], [src.loaders[role]],
                                      layer=layer, expert_tensor=True, qtype=qtype, imatrix=im))
    jobs, fallbacks = write_gguf(w, plan, requested, out, on_progress)
    expert_jobs = [j for j in jobs if j.tensor.expert_tensor]
    for job, want in zip(expert_jobs, (t for k in keys for t in types[k])):
        if job.qtype != want:
            raise ConvertError(f"{job.tensor.name} was written as {job.qtype.name}, the type table says {want.name}")
    return ExtendedReport(out, len(jobs), sum(j.nbytes for j in jobs), sum(j.nbytes for j in expert_jobs),
                          types, fallbacks)


def _add_value(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, float):
        w.add_float64(key, value)
    elif isinstance(value, int):
        w.add_uint64(key, value)
    else:
        raise TypeError(f"metadata {key}: unsupported value {value!r}")
