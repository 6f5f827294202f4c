"""`edgemoe convert --mixed`: importance-driven per-expert precision in the extended layout.

calibrate (converters/calibration.py) -> expected error of every expert in every candidate type
-> allocate types within the expert byte budget (converters/allocation.py) -> write the extended
layout with each expert in its type, quantized with its importance matrix
(converters/extended.py). Dense tensors keep one configurable type.
"""
from __future__ import annotations

import time
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


def expert_options(experts: dict[Key, ExpertSource], calib: Calibration) -> dict[Key, list[Option]]:
    """Per expert, each candidate type as (bytes, expected error); types that fall back to the
    same tensors as a smaller candidate are dropped."""
    options = {}
    for key, src in experts.items():
        stats, seen, opts = calib.experts[key], set(), []
        for qtype in sorted(calib.types, key=lambda t: src.nbytes(src.types(t))):
            actual = src.types(qtype)
            if actual in seen:
                continue
            seen.add(actual)
            opts.append(Option(qtype, src.nbytes(actual), stats.cost(qtype)))
        options[key] = opts
    return options


def convert_mixed(hf_dir: str | Path, out_path: str | Path, expert_bytes: str | int | None = None,
                  avg_bits: float | None = None, dense_type: str = "q8_0",
                  calibration: Calibration | str | Path | None = None, uniform_type: str | None = None,
                  imatrix: str = "never", n_tokens: int = 8192, types: tuple[QT, ...] = CANDIDATE_TYPES,
                  n_threads: int | None = None, exact: bool | None = None,
                  on_progress: ProgressFn | None = None, on_stage=None) -> MixedReport:
    """Calibrate (or reuse `calibration`), allocate types within the budget, write the extended
    layout. `calibration` may be a Calibration, a text/JSONL file, or None (the demo corpus).
    `uniform_type` writes every expert in that type instead (a baseline at equal layout).
    imatrix: "never" (default) quantizes no expert with its importance matrix, "always" every one,
    "auto" those where calibration measured a lower error with it in the chosen type (a fresh
    calibration measures errors the same way)."""
    start = time.perf_counter()
    out = Path(out_path)
    check_output_path(out)
    parse_output_type(dense_type)
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
        allocation = allocate(expert_options(experts, calibration), budget, exact)
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
