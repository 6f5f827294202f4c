"""`edgemoe compress`: MoE-I² end to end on an HF checkpoint, layer by layer.

`prepare` makes every check that can be made before any work; `decide` runs the two streamed
passes (search.py: importance, then per-layer genetic search, the KT-reception field and SVD),
the optional LoRA stage and the optional held-out evaluation, and writes every decision into
the report; `compress` hands the decisions to export.py as a CompressedModel and writes the
file (and the report) atomically. The pruning study (study.py) runs `decide` too.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgemoe.converters.atomic import atomic_output
from edgemoe.converters.compress.lowrank import Factors
from edgemoe.converters.compress.options import (CompressError, CompressOptions, ModelShape, check_against_model,
                                                 check_options, check_report_path)
from edgemoe.converters.compress.search import DropSet, drop_counts, importance_pass, search_pass
from edgemoe.converters.compress.stream import open_stream
from edgemoe.memory import return_large_frees_to_os

# (stage, done, total, label): one progress bar per stage
StageProgress = Callable[[str, int, int, str], None]


@dataclass
class Prepared:
    """Everything validated before work starts."""
    hf_dir: Path
    out: Path | None   # None: decide only, nothing is written (the pruning study)
    opts: CompressOptions
    conv: object
    shape: ModelShape
    text: object


@dataclass
class Decision:
    """What the search decided, before anything is written."""
    drops: dict[int, DropSet]                       # MoE layer -> dropped expert ids
    kept: dict[int, list[int]]                      # pruned MoE layers only -> kept expert ids
    low_rank: dict[tuple[int, int, str], Factors]   # (layer, expert, role) -> factors
    report: dict
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA-merged checkpoint tensors


@dataclass
class CompressResult:
    path: Path
    report: dict
    seconds: float
    model: object   # the export.CompressedModel written (kept ids, low-rank factors)


def prepare(hf_dir, out_path, opts: CompressOptions, report_path: Path | None = None) -> Prepared:
    """Every check that can be made before any work: settings, checkpoint, output, calibration text.
    out_path None: the run will only decide (`decide`), never write."""
    from edgemoe.converters.arch import converter_for
    from edgemoe.converters.atomic import check_output_path
    from edgemoe.converters.calib_text import calibration_text
    from edgemoe.converters.extended import split_plan
    from edgemoe.converters.hf_checkpoint import HFCheckpoint

    check_options(opts)
    out = Path(out_path) if out_path is not None else None
    if out is not None:
        check_output_path(out)
        check_report_path(report_path, out)
    conv = converter_for(HFCheckpoint(hf_dir))
    _, experts = split_plan(conv.plan())
    n_exp = Counter(layer for layer, _ in experts)
    if not n_exp:
        raise CompressError(f"{hf_dir} has no routed experts to compress")
    top_k = int(conv.ckpt.config.get("num_experts_per_tok") or 0)
    shape = ModelShape(dict(sorted(n_exp.items())), top_k, conv.n_layers)
    check_against_model(opts, shape)
    return Prepared(Path(hf_dir), out, opts, conv, shape, calibration_text(opts.calib))


def decide(p: Prepared, on_progress: StageProgress | None = None) -> Decision:
    """Search and decompose (streamed), then the optional LoRA stage and held-out evaluation."""
    from edgemoe.converters.compress.quality import heldout_text, streamed_quality

    return_large_frees_to_os()  # layer-sized tensors come and go: keep peak memory bounded (memory.py)
    o = p.opts
    progress = on_progress or (lambda *a: None)
    report: dict = {"checkpoint": str(p.hf_dir), "options": o.as_dict(), "layers": {}, "blocks": []}
    torch_threads = torch.get_num_threads()
    try:
        if o.n_threads:
            torch.set_num_threads(o.n_threads)
        with open_stream(p.conv, p.text, o.calib_tokens, o.window, o.n_threads) as s:
            report["calibration"] = {"source": p.text.source, "tokens": int(s.bounds[-1]),
                                     "windows": len(s.windows)}
            importance = importance_pass(s, progress)
            drops, factors = search_pass(s, o, importance, drop_counts(o, p.shape, importance), report, progress)
            if o.lora_steps:  # LoRA trains on the search's calibration windows; held-out ones cut as --eval cuts them
                lora_windows = (s.windows, s.tokenize(heldout_text(), o.eval_tokens) if o.eval_tokens else None)
    finally:
        torch.set_num_threads(torch_threads)
    kept = {l: [e for e in range(n) if e not in drops.get(l, ())] for l, n in p.shape.n_experts.items()
            if drops.get(l)}
    low_rank = {(l, e, role): f for (l, e), fs in factors.items() for role, f in fs.items()}
    report["summary"] = _summary(p, kept, low_rank)
    d = Decision(drops, kept, low_rank, report)
    if o.lora_steps:
        from edgemoe.converters.compress.lora import lora_recover

        d.overrides, report["lora"] = lora_recover(p.hf_dir, drops, low_rank, *lora_windows, o, progress)
    if o.eval_tokens and o.lora_steps:  # the fine-tuned weights exist only in the torch model
        lr = report["lora"]
        report["quality"] = dict(lr["heldout_after"], tokens=lr["heldout_tokens"], measured_with="transformers")
    elif o.eval_tokens:
        report["quality"] = streamed_quality(p.conv, drops, low_rank, o, progress)
    return d


def compress(p: Prepared, on_progress: StageProgress | None = None, report_path: Path | None = None) -> CompressResult:
    """Decide, then write the compressed model to p.out (and the report to report_path). Both
    appear complete or not at all."""
    from edgemoe.converters.compress.export import CompressedModel, export_compressed

    if p.out is None:
        raise ValueError("compress() needs an output path; prepare(hf_dir, out_path, ...) with out_path set")
    start = time.perf_counter()
    progress = on_progress or (lambda *a: None)
    d = decide(p, progress)
    report = d.report
    model = CompressedModel(kept=d.kept, low_rank=d.low_rank, overrides=d.overrides, report=report)  # (no timings: files repeat)
    search_s = round(time.perf_counter() - start, 2)
    with contextlib.ExitStack() as stack:
        report_tmp = stack.enter_context(atomic_output(Path(report_path))) if report_path else None
        export_compressed(p.hf_dir, p.out, model, dense_type=p.opts.dense_type, expert_type=p.opts.expert_type,
                          progress=lambda done, total, name: progress("export", done, total, name))
        report = dict(report, summary=dict(report["summary"], file_bytes=p.out.stat().st_size),
                      seconds={"search": search_s, "total": round(time.perf_counter() - start, 2)})
        if report_tmp is not None:
            write_report(report, report_tmp, Path(report_path).suffix)
    return CompressResult(p.out, report, time.perf_counter() - start, model)


def write_report(report: dict, path: Path, suffix: str = ".json") -> None:
    """JSON, or YAML for a .yaml/.yml suffix; integer keys (layer, expert ids) become strings in
    JSON and stay integers in YAML."""
    import json

    if suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(_plain(report), sort_keys=False), encoding="utf-8")
    else:
        path.write_text(json.dumps(_plain(report), indent=1), encoding="utf-8")


def _plain(v):
    """Report values as plain Python (tuples to lists, numbers to float/int) for JSON and YAML."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def _summary(p: Prepared, kept: dict[int, list[int]], low_rank: dict) -> dict:
    """Expert parameter counts before and after (values, not bytes: the file's bytes depend on
    the types export picks; the written file's size is added after export)."""
    from edgemoe.converters.extended import split_plan

    _, experts = split_plan(p.conv.plan())
    before = sum(src.n_params for src in experts.values())
    after = 0
    for (l, e), src in experts.items():
        if e not in kept.get(l, [e]):
            continue
        for role, (rows, cols) in src.shapes.items():
            f = low_rank.get((l, e, role))
            after += rows * cols if f is None else f.a.numel() + f.b.numel()
    return {"experts_before": len(experts), "experts_after": sum(len(v) for v in kept.values()) +
            sum(n for l, n in p.shape.n_experts.items() if l not in kept),
            "expert_params_before": before, "expert_params_after": after,
            "expert_param_share": after / max(before, 1)}
