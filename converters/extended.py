"""Writing edgemoe's extended GGUF layout (docs/FORMAT.md, names in `edgemoe.layout`): the stock
layout's metadata and dense tensors, and one 2-D tensor set per expert with its own type,
gate/up/down written back to back so one pread loads an expert.

Streams like `convert`: each expert matrix is read from the checkpoint, quantized and appended.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
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
from edgemoe.layout import (KEY_COUNTS, KEY_IDS, KEY_RANKS, KEY_TYPES, KEY_VERSION, ROLES, expert_tensor_name,
                            version_for)
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
class FactorPair:
    """A low-rank expert matrix in the file's orientation: W ~= b @ a, a [r, in], b [out, r]."""
    a: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        return self.a.shape[0]


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
                   on_progress: ProgressFn | None = None, kept: dict[int, list[int]] | None = None,
                   factors: dict[tuple[int, int, str], FactorPair] | None = None) -> ExtendedReport:
    """Write `conv`'s checkpoint to `out` in the extended layout: dense tensors in `dense_type`,
    expert (layer, e) in expert_types[(layer, e)] with its importance matrices (role -> [cols]).
    A compressed model (docs/FORMAT.md) also gives `kept` (layer -> original ids kept, ascending;
    other layers keep all) and `factors` ((layer, id, role) -> low-rank pair written instead of
    the full matrix). Keys are original ids; the report's types are keyed (layer, stored index)."""
    requested, file_type = parse_output_type(dense_type)
    dense, experts = split_plan(conv.plan())
    kept_ids = _kept_ids(conv, experts, kept or {})
    stored = [(layer, e) for layer in sorted(kept_ids) for e in kept_ids[layer]]
    if set(expert_types) != set(stored):
        raise ConvertError(f"expert types given for {len(expert_types)} experts; the file stores {len(stored)}")
    factors = factors or {}
    for layer, e, role in factors:
        if (layer, e) not in expert_types:
            raise ConvertError(f"low-rank factors given for layer {layer} expert {e}, which is not stored")
    counts = [len(kept_ids.get(layer, ())) for layer in range(conv.n_layers)]
    index = {key: i for layer in kept_ids for i, key in enumerate((layer, e) for e in kept_ids[layer])}
    types = {k: experts[k].types(q) for k, q in expert_types.items()}
    ranks = {k: tuple(factors[(*k, r)].rank if (*k, r) in factors else 0 for r in ROLES) for k in stored}

    w = gguf.GGUFWriter(path=None, arch=conv.arch_name)
    w.add_name(conv.ckpt.folder.resolve().name)
    conv.write_hparams(w)  # {arch}.expert_count stays the original count (router rows: per layer)
    w.add_file_type(int(file_type))  # the dense tensors' type; experts vary (edgemoe.expert_types)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, conv.ckpt.folder, int(conv.ckpt.config["vocab_size"]))
    w.add_uint32(KEY_VERSION, version_for(pruned=len(stored) < len(experts), low_rank=bool(factors)))
    w.add_key_value(KEY_COUNTS, counts, VT.ARRAY, sub_type=VT.UINT32)
    w.add_key_value(KEY_IDS, [e for _, e in stored], VT.ARRAY, sub_type=VT.UINT32)
    w.add_key_value(KEY_TYPES, [int(t) for k in stored for t in types[k]], VT.ARRAY, sub_type=VT.UINT32)
    if factors:
        w.add_key_value(KEY_RANKS, [r for k in stored for r in ranks[k]], VT.ARRAY, sub_type=VT.UINT32)
    for key, value in (extra_kv or {}).items():
        _add_value(w, key, value)

    plan = [_pruned_router(t, kept_ids[t.layer]) if _is_router(t) and t.layer in (kept or {}) else t
            for t in dense]
    expert_plan, expected = _expert_tensors(stored, experts, index, types, expert_types, factors, imatrix or {})
    plan += expert_plan
    jobs, fallbacks = write_gguf(w, plan, requested, out, on_progress)
    expert_jobs = [j for j in jobs if j.tensor.expert_tensor]
    for job, want in zip(expert_jobs, expected):
        if job.qtype != want:
            raise ConvertError(f"{job.tensor.name} was written as {job.qtype.name}, the type table says {want.name}")
    return ExtendedReport(out, len(jobs), sum(j.nbytes for j in jobs), sum(j.nbytes for j in expert_jobs),
                          {(k[0], index[k]): types[k] for k in stored}, fallbacks)


def _expert_tensors(stored: list[Key], experts: dict[Key, ExpertSource], index: dict[Key, int],
                    types: dict[Key, tuple[QT, QT, QT]], expert_types: dict[Key, QT],
                    factors: dict[tuple[int, int, str], FactorPair],
                    imatrix: dict[Key, dict[str, np.ndarray]]) -> tuple[list[PlannedTensor], list[QT]]:
    """The expert tensors in file order — per expert gate, up, down back to back, a low-rank
    matrix as its A then its B — and the type each must come out in. A factor takes the expert's
    type with the fallback for its own rows (A: `in` values, like the full matrix; B: rank)."""
    plan, expected = [], []
    for key in stored:
        layer, e = key
        src, i = experts[key], index[key]
        for role, qtype in zip(ROLES, types[key]):
            im = imatrix.get(key, {}).get(role)
            pair = factors.get((layer, e, role))
            if pair is None:
                plan.append(PlannedTensor(expert_tensor_name(layer, i, role), src.shapes[role], [src.loaders[role]],
                                          layer=layer, expert_tensor=True, qtype=qtype, imatrix=im))
                expected.append(qtype)
                continue
            for factor, data in (("a", pair.a), ("b", pair.b)):
                ftype = choose_type(expert_types[key], data.shape[1])
                plan.append(PlannedTensor(expert_tensor_name(layer, i, role, factor), tuple(data.shape),
                                          [lambda d=data: d], layer=layer, expert_tensor=True, qtype=ftype,
                                          imatrix=im if factor == "a" else None))
                expected.append(ftype)
    return plan, expected


def _kept_ids(conv: ArchConverter, experts: dict[Key, ExpertSource], kept: dict[int, list[int]]) -> dict[int, list[int]]:
    """Per MoE layer, the original ids stored: `kept`'s list where given (checked), else all."""
    n_in = {}
    for layer, e in experts:
        n_in[layer] = n_in.get(layer, 0) + 1
    for layer, n in n_in.items():
        if any((layer, e) not in experts for e in range(n)):
            raise ConvertError(f"layer {layer}: expert ids are not 0..{n - 1}")
    top_k = int(conv.hp.get("num_experts_per_tok") or 1)
    out = {layer: list(range(n)) for layer, n in n_in.items()}
    for layer, ids in kept.items():
        if layer not in n_in:
            raise ConvertError(f"kept experts given for layer {layer}, which has no routed experts "
                               f"(MoE layers: {sorted(n_in)})")
        ids = [int(e) for e in ids]
        if ids != sorted(set(ids)) or not all(0 <= e < n_in[layer] for e in ids):
            raise ConvertError(f"layer {layer}: kept expert ids {ids} must be ascending, distinct and in "
                               f"0..{n_in[layer] - 1}")
        if len(ids) < top_k:
            raise ConvertError(f"layer {layer} keeps {len(ids)} experts, fewer than the {top_k} each token is "
                               f"routed to (num_experts_per_tok); keep at least {top_k}")
        out[layer] = ids
    return out


def _is_router(t: PlannedTensor) -> bool:
    return t.layer is not None and t.name == gguf.TENSOR_NAMES[T.FFN_GATE_INP].format(bid=t.layer) + ".weight"


def _pruned_router(t: PlannedTensor, ids: list[int]) -> PlannedTensor:
    """The router with only the kept experts' rows, in kept order: row i scores stored expert i."""
    if len(t.parts) != 1 or len(t.shape) != 2:
        raise ConvertError(f"router {t.name} has shape {t.shape}; cannot select kept rows")
    return replace(t, shape=(len(ids), t.shape[1]),
                   parts=[lambda t=t, ids=ids: t.parts[0]().reshape(t.shape)[ids]])


def _add_value(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, float):
        w.add_float64(key, value)
    elif isinstance(value, int):
        w.add_uint64(key, value)
    else:
        raise TypeError(f"metadata {key}: unsupported value {value!r}")
