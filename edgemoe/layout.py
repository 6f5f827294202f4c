"""edgemoe's extended GGUF layout (docs/FORMAT.md): names and keys, in one place for the writer
(`edgemoe.converters.extended`) and the reader (`edgemoe.expert_store`).

Same architecture metadata and dense tensors as the stock layout; the routed experts are not
3-D `*_exps` tensors but one 2-D tensor set per expert, each with its own ggml type and written
contiguously per expert, described by keys under `edgemoe.`:

    edgemoe.layout_version   u32     LAYOUT_VERSION
    edgemoe.expert_counts    [u32]   experts stored per layer (0: a dense FFN layer)
    edgemoe.expert_ids       [u32]   layer-major: the original expert id of each stored expert
    edgemoe.expert_types     [u32]   layer-major, 3 per stored expert: ggml type of gate, up, down
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.gguf_file import EDGEMOE_KEY_PREFIX, GGUFFile, ModelFileError

LAYOUT_VERSION = 1
KEY_VERSION = EDGEMOE_KEY_PREFIX + "layout_version"
KEY_COUNTS = EDGEMOE_KEY_PREFIX + "expert_counts"
KEY_IDS = EDGEMOE_KEY_PREFIX + "expert_ids"
KEY_TYPES = EDGEMOE_KEY_PREFIX + "expert_types"
# reserved for MoE-I² low-rank experts (documented, not written yet): per stored expert, the rank
# of each of gate/up/down (0 = stored full rank)
KEY_RANKS = EDGEMOE_KEY_PREFIX + "expert_ranks"
# provenance of a mixed-precision file (optional; the engine does not need them)
KEY_MIXED_BUDGET = EDGEMOE_KEY_PREFIX + "mixed.budget_bytes"
KEY_MIXED_ERROR = EDGEMOE_KEY_PREFIX + "mixed.expected_error"
KEY_MIXED_GAP = EDGEMOE_KEY_PREFIX + "mixed.optimality_gap"
KEY_MIXED_SOURCE = EDGEMOE_KEY_PREFIX + "mixed.calibration"
KEY_MIXED_TOKENS = EDGEMOE_KEY_PREFIX + "mixed.calibration_tokens"

ROLES = ("gate", "up", "down")
_ROLE_TENSOR = {"gate": T.FFN_GATE, "up": T.FFN_UP, "down": T.FFN_DOWN}


def expert_tensor_name(layer: int, index: int, role: str, factor: str = "") -> str:
    """`blk.L.expert.E.ffn_{role}.weight`; factor "a"/"b" names the reserved low-rank factors
    `ffn_{role}_a` ([rank, in]) and `ffn_{role}_b` ([out, rank]), W ~= b @ a. E is the expert's
    index in its layer's router (its original id is in edgemoe.expert_ids)."""
    base = gguf.TENSOR_NAMES[_ROLE_TENSOR[role]].replace("blk.{bid}.", "blk.{bid}.expert.{xid}.")
    suffix = f"_{factor}" if factor else ""
    return base.format(bid=layer, xid=index) + suffix + ".weight"


@dataclass(frozen=True)
class ExtendedLayout:
    version: int
    expert_counts: tuple[int, ...]                        # per layer
    expert_ids: tuple[tuple[int, ...], ...]                # per layer: original ids of stored experts
    expert_types: dict[tuple[int, int], tuple[QT, QT, QT]]  # (layer, index) -> gate, up, down types

    @property
    def n_experts(self) -> int:
        return sum(self.expert_counts)


def is_extended(model: GGUFFile) -> bool:
    return model.field(KEY_VERSION) is not None


def read_layout(model: GGUFFile) -> ExtendedLayout:
    """The `edgemoe.` expert tables, checked against each other and against the tensors."""
    version = int(model.require(KEY_VERSION))
    if version != LAYOUT_VERSION:
        raise ModelFileError(f"{model.path}: edgemoe layout version {version} is not supported by this edgemoe "
                             f"(it reads version {LAYOUT_VERSION}); upgrade edgemoe or re-convert the model")
    n_layers = int(model.arch_field("block_count", 0))
    counts = [int(x) for x in model.require(KEY_COUNTS)]
    if len(counts) != n_layers:
        raise ModelFileError(f"{model.path}: {KEY_COUNTS} has {len(counts)} entries for {n_layers} layers")
    ids = [int(x) for x in model.require(KEY_IDS)]
    types = [int(x) for x in model.require(KEY_TYPES)]
    total = sum(counts)
    if len(ids) != total or len(types) != 3 * total:
        raise ModelFileError(f"{model.path}: {KEY_IDS} / {KEY_TYPES} have {len(ids)} / {len(types)} entries; "
                             f"{KEY_COUNTS} says {total} experts (3 types each)")
    per_layer, table, pos = [], {}, 0
    for layer, n in enumerate(counts):
        per_layer.append(tuple(ids[pos:pos + n]))
        for i in range(n):
            try:
                table[(layer, i)] = tuple(QT(t) for t in types[3 * (pos + i):3 * (pos + i) + 3])
            except ValueError:
                raise ModelFileError(f"{model.path}: {KEY_TYPES} names an unknown ggml type for layer {layer} "
                                     f"expert {i}") from None
        pos += n
    if model.field(KEY_RANKS) is not None or any(name.endswith(("_a.weight", "_b.weight")) and ".expert." in name
                                                  for name in model.tensors):
        raise ModelFileError(f"{model.path} holds low-rank expert factors, which this edgemoe cannot run yet")
    return ExtendedLayout(version, tuple(counts), tuple(per_layer), table)
