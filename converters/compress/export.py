"""Writing a MoE-I² compressed model (pruned experts + low-rank experts) in edgemoe's extended
GGUF layout (docs/FORMAT.md, "Compressed models"), streamed from the HF checkpoint like `convert`.

`CompressedModel` is what the search (converters/compress/pipeline.py) hands over: which experts
each layer keeps, the low-rank factors of decomposed expert matrices, and replacement tensors
(e.g. LoRA-merged weights). Factor orientation — the one place the naming flip is mapped:
lowrank.Factors holds W ~= a @ b with a [out, r], b [r, in]; the file's `ffn_{role}_a` is
[r, in] (= Factors.b, applied to x first) and `ffn_{role}_b` is [out, r] (= Factors.a), W ~= B·A.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgemoe.converters.arch import converter_for
from edgemoe.converters.atomic import check_output_path
from edgemoe.converters.convert import ProgressFn
from edgemoe.converters.compress.lowrank import Factors
from edgemoe.converters.errors import ConvertError
from edgemoe.converters.extended import FactorPair, split_plan, write_extended
from edgemoe.converters.hf_checkpoint import HFCheckpoint
from edgemoe.converters.types import parse_output_type
from edgemoe.layout import KEY_COMPRESS_REPORT, ROLES


@dataclass
class CompressedModel:
    kept: dict[int, list[int]]      # HF decoder-layer index -> original expert ids kept (ascending); MoE layers absent = unpruned
    low_rank: dict[tuple[int, int, str], Factors]   # (layer, ORIGINAL expert id, role "gate"|"up"|"down") -> Factors (W ~= a @ b)
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # HF checkpoint tensor name -> same-shape replacement
    report: dict | None = None      # stored as JSON under edgemoe.compress.report (provenance only)


class _OverlayCheckpoint(HFCheckpoint):
    """The checkpoint with some tensors replaced in memory (same name, same shape)."""

    def __init__(self, folder, overrides: dict[str, torch.Tensor]):
        super().__init__(folder)
        self.overrides: dict[str, np.ndarray] = {}
        for name, tensor in overrides.items():
            if name not in self.tensors:
                raise ConvertError(f"override {name!r} names no tensor of the checkpoint {self.folder}")
            if tuple(tensor.shape) != self.shape(name):
                raise ConvertError(f"override {name!r} has shape {tuple(tensor.shape)}; the checkpoint's tensor "
                                   f"is {self.shape(name)}")
            self.overrides[name] = tensor.detach().to(torch.float32).cpu().numpy()

    def load(self, name: str, index: int | None = None) -> np.ndarray:
        if name not in self.overrides:
            return super().load(name, index)
        data = self.overrides[name]
        return np.ascontiguousarray(data if index is None else data[index])


def export_compressed(hf_dir, out_path, model: CompressedModel, *, dense_type: str = "f16",
                      expert_type: str = "q8_0", expert_types: dict[tuple[int, int], str] | None = None,
                      progress: ProgressFn | None = None) -> Path:
    """Write `model` (the checkpoint at `hf_dir` with `model`'s pruning, factors and overrides) to
    `out_path` atomically. Experts take `expert_type`, or expert_types[(layer, original id)];
    factors are quantized in their expert's type where their rows fit it (else the layout's
    usual fallback). Refused with ConvertError: a pruned layer keeping fewer than top-k experts,
    unknown layers/ids/roles, factors whose shapes do not match their matrix."""
    out = Path(out_path)
    check_output_path(out)
    parse_output_type(dense_type)
    conv = converter_for(_OverlayCheckpoint(hf_dir, model.overrides))
    _, experts = split_plan(conv.plan())
    if not experts:
        raise ConvertError(f"{hf_dir} has no routed experts to compress")
    stored = {(layer, e) for layer, e in experts if e in model.kept.get(layer, [e])}
    for (layer, e), qname in (expert_types or {}).items():
        if (layer, e) not in stored:
            raise ConvertError(f"expert_types names layer {layer} expert {e}, which is not a stored expert")
        parse_output_type(qname)
    types = {k: parse_output_type((expert_types or {}).get(k, expert_type))[0] for k in stored}
    factors = {}
    for (layer, e, role), f in model.low_rank.items():
        if role not in ROLES:
            raise ConvertError(f"low-rank factors for layer {layer} expert {e}: unknown role {role!r}; "
                               f"expected one of {ROLES}")
        if (layer, e) not in stored:
            raise ConvertError(f"low-rank factors for layer {layer} expert {e} {role}: that expert is "
                               "pruned or does not exist")
        rows, cols = experts[(layer, e)].shapes[role]
        if f.a.ndim != 2 or f.b.ndim != 2 or f.a.shape[0] != rows or f.b.shape[1] != cols \
                or f.a.shape[1] != f.b.shape[0]:
            raise ConvertError(f"low-rank factors for layer {layer} expert {e} {role}: a {tuple(f.a.shape)} @ "
                               f"b {tuple(f.b.shape)} does not give the matrix's [{rows}, {cols}]")
        # the flip: file A = Factors.b [r, in], file B = Factors.a [out, r]
        factors[(layer, e, role)] = FactorPair(a=f.b.detach().to(torch.float32).cpu().numpy(),
                                               b=f.a.detach().to(torch.float32).cpu().numpy())
    extra = {KEY_COMPRESS_REPORT: json.dumps(_jsonable(model.report))} if model.report is not None else {}
    write_extended(conv, out, dense_type, types, extra_kv=extra, on_progress=progress,
                   kept=model.kept, factors=factors)
    return out


def _jsonable(value):
    """The report as JSON values: tuple keys as "a,b", tensors and arrays as lists, else str()."""
    if isinstance(value, dict):
        return {(",".join(map(str, k)) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return _jsonable(value.tolist())
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
