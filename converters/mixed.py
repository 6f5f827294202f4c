"""`edgemoe convert --mixed`: importance-driven per-expert precision in the extended layout.

calibrate (converters/calibration.py) -> expected error of every expert in every candidate type
-> allocate types within the expert byte budget (converters/allocation.py) -> write the extended
layout with each expert in its type, quantized with its importance matrix
(converters/extended.py). Dense tensors keep one configurable type.

Granularity (`--mixed-per`): "expert" (default) gives each expert its own type; "layer" gives
all experts of a layer one type, chosen per layer by the same knapsack over the layers' summed
bytes and errors. A layer of one type is one arena in the engine (edgemoe/arenas.py), so a
decode step with every expert resident runs as one graph (edgemoe/token_graph.py); experts of
several types in a layer run layer by layer, two graph computes per layer. Candidate types
(`--mixed-types`): q2_k..q8_0 by default, or "repacked", the ones ggml's CPU backend on this
machine multiplies repacked (edgemoe/native/repack.py: q4_k, and q2_k on AVX-512), whose
kernels are the faster ones at full budget (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as QT

from edgemoe.converters.allocation import Allocation, AllocationError, Option, allocate, minimum_bytes
from edgemoe.converters.arch import converter_for
from edgemoe.converters.atomic import check_output_path
from edgemoe.converters.calib_text import calibration_text
from edgemoe.converters.calibration import CANDIDATE_TYPES, Calibration, calibrate
from edgemoe.converters.convert import ProgressFn
from edgemoe.converters.errors import ConvertError
from edgemoe.converters.extended import ExpertSource, ExtendedReport, split_plan, write_extended
from edgemoe.converters.hf_checkpoint import HFCheckpoint
from edgemoe.converters.types import parse_output_type
from edgemoe.layout import KEY_MIXED_BUDGET, KEY_MIXED_ERROR, KEY_MIXED_GAP, KEY_MIXED_SOURCE, KEY_MIXED_TOKENS

Key = tuple[int, int]
GRANULARITIES = ("expert", "layer")
REPACKED = "repacked"  # --mixed-types: the candidate types this machine's CPU backend repacks


@dataclass(frozen=True)
class MixedReport:
    written: ExtendedReport
    budget_bytes: int | None       # None for a uniform file
    allocation: Allocation | None
    calibration: Calibration
    seconds: float

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for types in self.written.types.values():
            counts[types[0].name.lower()] = counts.get(types[0].name.lower(), 0) + 1
        return counts


def expert_budget(experts: dict[Key, ExpertSource], expert_bytes: str | int | None = None,
                  avg_bits: float | None = None, types: tuple[QT, ...] = CANDIDATE_TYPES) -> int:
    """--expert-bytes / --avg-bits -> bytes for all experts, refused below every expert at the
    smallest type (the error names that minimum in both units)."""
    from edgemoe.memory import parse_bytes

    if (expert_bytes is None) == (avg_bits is None):
        raise ConvertError("give exactly one of --expert-bytes (e.g. 1.5GB) and --avg-bits (e.g. 3.5)")
    n_params = sum(src.n_params for src in experts.values())
    budget = parse_bytes(expert_bytes) if expert_bytes is not None else int(float(avg_bits) * n_params / 8)
    smallest = min(types, key=lambda t: experts_bytes(experts, t))
    low = experts_bytes(experts, smallest)
    if budget < low:
        asked = f"{expert_bytes}" if expert_bytes is not None else f"--avg-bits {avg_bits}"
        raise AllocationError(
            f"expert budget {asked} = {budget:,} bytes is below the minimum {low:,} bytes "
            f"({low / 2**20:.2f} MiB, every expert at {smallest.name.lower()}, "
            f"{8 * low / n_params:.3f} bits per weight); raise --expert-bytes to at least {low} "
            f"or --avg-bits to at least {8 * low / n_params:.3f}")
    return budget


def experts_bytes(experts: dict[Key, ExpertSource], qtype: QT) -> int:
    """Bytes of all experts in one type (with the per-row fallbacks the writer would take)."""
    return sum(src.nbytes(src.types(qtype)) for src in experts.values())


def expert_options(experts: dict[Key, ExpertSource], calib: Calibration,
                   types: tuple[QT, ...] | None = None) -> dict[Key, list[Option]]:
    """Per expert, each candidate type (`types`, default the calibration's) as (bytes, expected
    error); types that fall back to the same tensors as a smaller candidate are dropped."""
    options = {}
    for key, src in experts.items():
        stats, seen, opts = calib.experts[key], set(), []
        for qtype in sorted(_measured(calib, types), key=lambda t: src.nbytes(src.types(t))):
            actual = src.types(qtype)
            if actual in seen:
                continue
            seen.add(actual)
            opts.append(Option(qtype, src.nbytes(actual), stats.cost(qtype)))
        options[key] = opts
    return options


def _measured(calib: Calibration, types: tuple[QT, ...] | None) -> tuple[QT, ...]:
    """`types` (None: all the calibration measured), refused where the calibration has no errors for one."""
    if types is None:
        return calib.types
    missing = [t.name.lower() for t in types if t not in calib.types]
    if missing:
        raise ConvertError(f"the calibration measured no errors for {', '.join(missing)} (it has "
                           f"{', '.join(t.name.lower() for t in calib.types)}); calibrate again with those types")
    return types


def layer_options(experts: dict[Key, ExpertSource], calib: Calibration,
                  types: tuple[QT, ...] | None = None) -> dict[int, list[Option]]:
    """Per layer, each candidate type given to every expert of it, as (bytes, expected error),
    both summed over the layer's experts; a type whose tensors are those of a smaller candidate
    for every expert (the writer's fallbacks) is dropped, as in expert_options."""
    by_layer: dict[int, list[Key]] = defaultdict(list)
    for key in sorted(experts):
        by_layer[key[0]].append(key)
    options = {}
    for layer, keys in by_layer.items():
        actual = {t: tuple(experts[k].types(t) for k in keys) for t in _measured(calib, types)}
        size = {t: sum(experts[k].nbytes(written) for k, written in zip(keys, actual[t])) for t in actual}
        seen, opts = set(), []
        for qtype in sorted(actual, key=size.__getitem__):
            if actual[qtype] in seen:
                continue
            seen.add(actual[qtype])
            opts.append(Option(qtype, size[qtype], sum(calib.experts[k].cost(qtype) for k in keys)))
        options[layer] = opts
    return options


def allocate_types(experts: dict[Key, ExpertSource], calib: Calibration, budget: int, per: str = "expert",
                   exact: bool | None = None, types: tuple[QT, ...] | None = None) -> Allocation:
    """Types among `types` (default: the calibration's) within `budget` bytes at granularity `per`
    ("expert" or "layer"); the choice is per expert either way (a layer's copied to its experts)."""
    check_granularity(per)
    if per == "expert":
        return allocate(expert_options(experts, calib, types), budget, exact)
    by_layer = allocate(layer_options(experts, calib, types), budget, exact)
    choice = {key: by_layer.choice[key[0]] for key in sorted(experts)}
    return Allocation(choice, by_layer.total_bytes, by_layer.objective, by_layer.lower_bound, f"{by_layer.method}, per layer")


def check_granularity(per: str) -> None:
    if per not in GRANULARITIES:
        raise ConvertError(f"unknown granularity {per!r}; choose one of {', '.join(GRANULARITIES)}")


def parse_candidate_types(text: str | None) -> tuple[QT, ...]:
    """--mixed-types: None -> every candidate (q2_k..q8_0); "repacked" -> those this machine's
    CPU backend multiplies repacked; else comma-separated names among the candidates."""
    if text is None:
        return CANDIDATE_TYPES
    if text.strip().lower() == REPACKED:
        from edgemoe.native import repack

        found = tuple(t for t in CANDIDATE_TYPES if repack.repacks_type(int(t)))
        if not found:
            raise ConvertError("this machine's ggml CPU backend repacks none of the candidate types "
                               f"({', '.join(t.name.lower() for t in CANDIDATE_TYPES)}); name the types instead")
        return found
    names = {t.name.lower(): t for t in CANDIDATE_TYPES}
    chosen = []
    for name in (n.strip().lower() for n in text.split(",")):
        if name not in names:
            raise ConvertError(f"unknown expert type {name!r} in --mixed-types; choose among "
                               f"{', '.join(names)} or {REPACKED!r}")
        if names[name] not in chosen:
            chosen.append(names[name])
    return tuple(sorted(chosen, key=CANDIDATE_TYPES.index))


def convert_mixed(hf_dir: str | Path, out_path: str | Path, expert_bytes: str | int | None = None,
                  avg_bits: float | None = None, dense_type: str = "q8_0",
                  calibration: Calibration | str | Path | None = None, uniform_type: str | None = None,
                  imatrix: str = "never", n_tokens: int = 8192, types: tuple[QT, ...] = CANDIDATE_TYPES,
                  n_threads: int | None = None, exact: bool | None = None, per: str = "expert",
                  on_progress: ProgressFn | None = None, on_stage=None) -> MixedReport:
    """Calibrate (or reuse `calibration`), allocate types within the budget, write the extended
    layout. `calibration` may be a Calibration, a text/JSONL file, or None (the demo corpus).
    `uniform_type` writes every expert in that type instead (a baseline at equal layout).
    per: "expert" or "layer", the granularity of the choice (module docstring).
    imatrix: "never" (default) quantizes no expert with its importance matrix, "always" every one,
    "auto" those where calibration measured a lower error with it in the chosen type (a fresh
    calibration measures errors the same way)."""
    start = time.perf_counter()
    out = Path(out_path)
    check_output_path(out)
    parse_output_type(dense_type)
    check_granularity(per)  # before calibrating
    conv = converter_for(HFCheckpoint(hf_dir))
    _, experts = split_plan(conv.plan())
    if not experts:
        raise ConvertError(f"{hf_dir} has no routed experts to give mixed precision")
    budget = None if uniform_type else expert_budget(experts, expert_bytes, avg_bits, types)  # fail before calibrating
    if not isinstance(calibration, Calibration):
        text = calibration_text(calibration)
        if on_stage:
            on_stage(f"calibrating on {text.source}")
        calibration = calibrate(hf_dir, text, n_tokens=n_tokens, types=types, work_dir=out.parent,
                                n_threads=n_threads, imatrix=imatrix, on_progress=on_progress)
    allocation = None
    if uniform_type:
        qtype = parse_output_type(uniform_type)[0]
        chosen = {key: qtype for key in experts}
        extra = {}
    else:
        allocation = allocate_types(experts, calibration, budget, per, exact, types)
        chosen = dict(allocation.choice)
        extra = {KEY_MIXED_BUDGET: budget, KEY_MIXED_ERROR: allocation.objective, KEY_MIXED_GAP: allocation.gap}
    extra |= {KEY_MIXED_SOURCE: calibration.source, KEY_MIXED_TOKENS: calibration.n_tokens}
    if on_stage:
        on_stage("writing")
    written = write_extended(conv, out, dense_type, chosen, calibration.imatrices(chosen, imatrix),
                             extra, on_progress)
    return MixedReport(written, budget, allocation, calibration, time.perf_counter() - start)


def minimum_expert_bytes(hf_dir: str | Path, types: tuple[QT, ...] = CANDIDATE_TYPES) -> int:
    _, experts = split_plan(converter_for(HFCheckpoint(hf_dir)).plan())
    return minimum_bytes({k: [Option(t, src.nbytes(src.types(t)), 0.0) for t in types] for k, src in experts.items()})
