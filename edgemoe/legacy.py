"""Mixtral GGUF files from llama.cpp's converters before April 2024 store each expert's matrices
as their own 2-D tensors, `blk.N.ffn_{gate,up,down}.E.weight`, where current files hold one 3-D
tensor per role (`blk.N.ffn_gate_exps.weight` [E, F, D]). llama.cpp 0.3.36 no longer loads that
layout and the edgemoe engine reads the current one; such files are still on the hub.

`upgrade` rewrites one in the current layout byte for byte: expert e's quantized bytes become
slice e of the 3-D tensor (they already have that row layout), nothing is re-quantized, and the
result loads in llama.cpp and in the engine.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import gguf
from gguf import MODEL_TENSOR as T

from edgemoe.gguf_file import GGUFFile, ModelFileError, TensorInfo
from edgemoe.gguf_rewrite import TensorSource, rewrite, same_tensors

_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")
_MERGED = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP}


def per_expert_tensors(model: GGUFFile) -> dict[tuple[int, str], dict[int, TensorInfo]]:
    """(layer, role) -> expert id -> its 2-D tensor; empty for a current-layout file."""
    found: dict[tuple[int, str], dict[int, TensorInfo]] = defaultdict(dict)
    for name, t in model.tensors.items():
        if m := _PER_EXPERT.fullmatch(name):
            found[(int(m[1]), m[2])][int(m[3])] = t
    return dict(found)


def check_current_layout(model: GGUFFile) -> None:
    """Refuse a per-expert file with what it is and the command that converts it."""
    if per_expert_tensors(model):
        raise ModelFileError(
            f"{model.path} stores its experts one tensor per expert (blk.N.ffn_gate.E.weight), the layout of "
            "llama.cpp's converters before April 2024, which llama.cpp 0.3.36 and edgemoe no longer read; "
            f"rewrite it in the current layout (byte for byte, no re-quantization) with: "
            f"edgemoe upgrade {model.path} -o NEW.gguf")


def upgrade(src: str | Path, out: str | Path) -> int:
    """Rewrite per-expert file `src` as `out` with 3-D expert tensors; returns the tensors merged."""
    model = GGUFFile(src)
    groups = per_expert_tensors(model)
    if not groups:
        raise ModelFileError(f"{src} already stores experts as 3-D tensors (or has none); nothing to upgrade")
    n_expert = model.arch_field("expert_count")
    merged = {key: _merged(model, key, experts, n_expert) for key, experts in sorted(groups.items())}
    first_of = {min(experts.values(), key=lambda t: t.offset).name: key for key, experts in groups.items()}
    tensors = []
    for t in same_tensors(model):  # file order; a merged tensor takes its first expert's place
        if t.name in first_of:
            tensors.append(merged[first_of[t.name]])
        elif not _PER_EXPERT.fullmatch(t.name):
            tensors.append(t)
    rewrite(model, Path(out), tensors)
    return len(merged)


def _merged(model: GGUFFile, key: tuple[int, str], experts: dict[int, TensorInfo], n_expert) -> TensorSource:
    layer, role = key
    if sorted(experts) != list(range(len(experts))) or (n_expert is not None and len(experts) != n_expert):
        raise ModelFileError(f"{model.path}: layer {layer} has {role} tensors for experts {sorted(experts)}, but "
                             f"expert_count is {n_expert}; the file is incomplete")
    first = experts[0]
    for e, t in experts.items():
        if (t.shape, t.qtype) != (first.shape, first.qtype) or len(t.shape) != 2:
            raise ModelFileError(f"{model.path}: {t.name} is {t.qtype.name} {list(t.shape)} but expert 0's is "
                                 f"{first.qtype.name} {list(first.shape)}; a 3-D tensor needs one type and shape")
    name = gguf.TENSOR_NAMES[_MERGED[role]].format(bid=layer) + ".weight"
    if name in model.tensors:
        raise ModelFileError(f"{model.path} holds both {name} and per-expert {role} tensors of layer {layer}")
    return TensorSource(name, (len(experts), *first.shape), first.qtype,
                        tuple((experts[e].offset, experts[e].nbytes) for e in range(len(experts))))
