"""edgemoe's extended GGUF layout (docs/FORMAT.md): names and keys, in one place for the writer
(`edgemoe.converters.extended`) and the reader (`edgemoe.expert_store`).

Same architecture metadata and dense tensors as the stock layout; the routed experts are not
3-D `*_exps` tensors but one 2-D tensor set per expert, each with its own ggml type and written
contiguously per expert, described by keys under `edgemoe.`:

    edgemoe.layout_version   u32     LAYOUT_VERSION
    edgemoe.expert_counts    [u32]   experts stored per layer (0: a dense FFN layer)
    edgemoe.expert_ids       [u32]   layer-major: the original expert id of each stored expert
    edgemoe.expert_types     [u32]   layer-major, 3 per stored expert: ggml type of gate, up, down
    edgemoe.expert_ranks     [u32]   optional (version 2), 3 per stored expert: rank of gate, up,
                                     down stored as factors `ffn_{role}_a` [r, in] and
                                     `ffn_{role}_b` [out, r] (W ~= B·A); 0 = the full matrix

Version 2 (written for compressed models; uncompressed ones stay version 1) adds pruned layers
(router `ffn_gate_inp` with one row per stored expert, fewer than `{arch}.expert_count`, at least
`{arch}.expert_used_count`) and low-rank experts; version 1 files are read as before (no ranks;
a ranks table or factor tensor in one is refused).
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.gguf_file import EDGEMOE_KEY_PREFIX, GGUFFile, ModelFileError

LAYOUT_VERSION = 2  # the newest version; the writer writes the lowest one that describes the file
READABLE_VERSIONS = (1, 2)
KEY_VERSION = EDGEMOE_KEY_PREFIX + "layout_version"
KEY_COUNTS = EDGEMOE_KEY_PREFIX + "expert_counts"
KEY_IDS = EDGEMOE_KEY_PREFIX + "expert_ids"
KEY_TYPES = EDGEMOE_KEY_PREFIX + "expert_types"
# MoE-I² low-rank experts (version 2): per stored expert, the rank of each of gate/up/down (0 = full)
KEY_RANKS = EDGEMOE_KEY_PREFIX + "expert_ranks"
# provenance of a compressed file: the compression report as JSON (the engine does not need it)
KEY_COMPRESS_REPORT = EDGEMOE_KEY_PREFIX + "compress.report"
# provenance of a mixed-precision file (optional; the engine does not need them)
KEY_MIXED_BUDGET = EDGEMOE_KEY_PREFIX + "mixed.budget_bytes"
KEY_MIXED_ERROR = EDGEMOE_KEY_PREFIX + "mixed.expected_error"
KEY_MIXED_GAP = EDGEMOE_KEY_PREFIX + "mixed.optimality_gap"
KEY_MIXED_SOURCE = EDGEMOE_KEY_PREFIX + "mixed.calibration"
KEY_MIXED_TOKENS = EDGEMOE_KEY_PREFIX + "mixed.calibration_tokens"

ROLES = ("gate", "up", "down")
_ROLE_TENSOR = {"gate": T.FFN_GATE, "up": T.FFN_UP, "down": T.FFN_DOWN}


def expert_tensor_name(layer: int, index: int, role: str, factor: str = "") -> str:
    """`blk.L.expert.E.ffn_{role}.weight`; factor "a"/"b" names the low-rank factors
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
    # (layer, index) -> rank of gate, up, down (0 = full matrix); all zero without a ranks table
    expert_ranks: dict[tuple[int, int], tuple[int, int, int]]

    @property
    def low_rank(self) -> bool:
        return any(any(r) for r in self.expert_ranks.values())

    @property
    def n_experts(self) -> int:
        return sum(self.expert_counts)


def version_for(pruned: bool, low_rank: bool) -> int:
    """1 for an uncompressed file (older edgemoe reads it), 2 once a layer is pruned or low-rank."""
    return LAYOUT_VERSION if pruned or low_rank else 1


def is_extended(model: GGUFFile) -> bool:
    return model.field(KEY_VERSION) is not None


def read_layout(model: GGUFFile) -> ExtendedLayout:
    """The `edgemoe.` expert tables, checked against each other and against the tensors."""
    version = int(model.require(KEY_VERSION))
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{model.path}: edgemoe layout version {version} is not supported by this edgemoe "
                             f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade edgemoe or "
                             "re-convert the model")
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
    _check_routers(model, counts)
    ranks = _read_ranks(model, version, total)
    per_layer, table, rank_table, pos = [], {}, {}, 0
    for layer, n in enumerate(counts):
        per_layer.append(tuple(ids[pos:pos + n]))
        for i in range(n):
            rank_table[(layer, i)] = tuple(ranks[3 * (pos + i):3 * (pos + i) + 3])
            try:
                table[(layer, i)] = tuple(QT(t) for t in types[3 * (pos + i):3 * (pos + i) + 3])
            except ValueError:
                raise ModelFileError(f"{model.path}: {KEY_TYPES} names an unknown ggml type for layer {layer} "
                                     f"expert {i}") from None
        pos += n
    return ExtendedLayout(version, tuple(counts), tuple(per_layer), table, rank_table)


def _check_routers(model: GGUFFile, counts: list[int]) -> None:
    """Each MoE layer's router has one row per stored expert, and at least top-k of them."""
    top_k = int(model.arch_field("expert_used_count", 0))
    for layer, n in enumerate(counts):
        if not n:
            continue
        if n < top_k:
            raise ModelFileError(f"{model.path}: layer {layer} stores {n} experts, fewer than the {top_k} each token "
                                 f"is routed to ({model.arch}.expert_used_count); re-export it keeping at least {top_k}")
        router = model.tensors.get(f"blk.{layer}.ffn_gate_inp.weight")
        if router is not None and (len(router.shape) != 2 or router.shape[0] != n):
            raise ModelFileError(f"{model.path}: {router.name} has shape {list(router.shape)}; {KEY_COUNTS} says "
                                 f"layer {layer} stores {n} experts (one router row each)")


def _read_ranks(model: GGUFFile, version: int, total: int) -> list[int]:
    field = model.field(KEY_RANKS)
    if version == 1:
        if field is not None or any(name.endswith(("_a.weight", "_b.weight")) and ".expert." in name
                                    for name in model.tensors):
            raise ModelFileError(f"{model.path}: layout version 1 holds low-rank expert factors, which version 1 "
                                 "does not define; re-export the model with this edgemoe (version 2)")
        return [0] * (3 * total)
    if field is None:
        return [0] * (3 * total)
    try:
        ranks = [int(x) for x in field]
    except (TypeError, ValueError):
        raise ModelFileError(f"{model.path}: {KEY_RANKS} is not an array of integers; re-export the model") from None
    if len(ranks) != 3 * total:
        raise ModelFileError(f"{model.path}: {KEY_RANKS} has {len(ranks)} entries; {KEY_COUNTS} says {total} "
                             "experts (3 ranks each)")
    return ranks
