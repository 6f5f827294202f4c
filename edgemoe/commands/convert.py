"""`edgemoe convert`, `compress` and `inspect`: files in, files out."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgemoe.commands.common import write_progress
from edgemoe.errors import InputError
from edgemoe.gguf_file import GGUFFile


def convert_cmd(args: argparse.Namespace) -> int:
    from edgemoe.converters.convert import convert

    console = Console(stderr=True)
    with write_progress(console) as (on_progress, on_stage):
        if getattr(args, "mixed", False):
            return _convert_mixed(args, console, on_progress, on_stage)
        if (args.expert_bytes is not None or args.avg_bits is not None or args.calibration is not None
                or args.mixed_types is not None or args.mixed_per != "expert"):
            raise InputError("--expert-bytes, --avg-bits, --calibration, --mixed-types and --mixed-per need --mixed")
        report = convert(args.hf_dir, args.output, args.type or "f16", on_progress=on_progress)
    console.print(f"wrote {report.path} ({report.architecture}, {report.n_tensors} tensors, "
                  f"{report.total_bytes / 2**20:.1f} MiB, experts {report.expert_bytes / 2**20:.1f} MiB) "
                  f"in {report.seconds:.1f}s")
    for name, used in report.fallbacks.items():
        console.print(f"  {name}: row length does not fit {args.type} blocks, stored as {used}")
    return 0


def _convert_mixed(args: argparse.Namespace, console: Console, on_progress, on_stage) -> int:
    from edgemoe.converters.mixed import convert_mixed, parse_candidate_types

    r = convert_mixed(args.hf_dir, args.output, args.expert_bytes, args.avg_bits, args.type or "q8_0",
                      args.calibration, imatrix=args.imatrix, n_tokens=args.calibration_tokens,
                      types=parse_candidate_types(args.mixed_types), per=args.mixed_per,
                      on_progress=on_progress, on_stage=on_stage)
    w, a = r.written, r.allocation
    console.print(f"wrote {w.path} (edgemoe extended layout, not loadable by stock llama.cpp; {w.n_tensors} tensors, "
                  f"{w.total_bytes / 2**20:.1f} MiB, experts {w.expert_bytes / 2**20:.2f} MiB of a "
                  f"{r.budget_bytes / 2**20:.2f} MiB budget) in {r.seconds:.1f}s")
    console.print("expert types: " + ", ".join(f"{t}×{n}" for t, n in sorted(r.type_counts().items())))
    console.print(f"calibration: {r.calibration.n_tokens} tokens of {r.calibration.source}; expected output "
                  f"error {a.objective:.4g} ({a.method}, optimality gap {a.gap:.3g})")
    return 0


def compress_cmd(args: argparse.Namespace) -> int:
    from edgemoe.converters.compress.options import CompressOptions
    from edgemoe.converters.compress.pipeline import compress, prepare

    opts = CompressOptions(prune=args.prune, rank_ratio=args.rank_ratio, svd=args.svd, method=args.method,
                           population=args.population, generations=args.generations, crossover=args.crossover,
                           mutation=args.mutation, seed=args.seed, keep_k=args.keep_k, block_t=args.block_t,
                           calib=args.calib, calib_tokens=args.calib_tokens, kt_tokens=args.kt_tokens,
                           expert_type=args.type, dense_type=args.dense_type, eval_tokens=args.eval_tokens,
                           lora_steps=args.lora_steps, lora_rank=args.lora_rank, lora_lr=args.lora_lr,
                           n_threads=args.threads)
    prepared = prepare(args.hf_dir, args.output, opts, args.report)  # every check before any work
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int, label: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total, description=f"{stage:<10} {label[:28]:<28}")

        result = compress(prepared, on_progress, report_path=args.report)
    s = result.report["summary"]
    console.print(f"wrote {result.path} (edgemoe extended layout, not loadable by stock llama.cpp; "
                  f"{s['experts_after']} of {s['experts_before']} experts, {s['expert_param_share']:.0%} of the expert "
                  f"parameters, {s['file_bytes'] / 2**20:.1f} MiB) in {result.seconds:.1f}s")
    kept = ", ".join(str(r["kept_count"]) for r in result.report["layers"].values())
    console.print(f"experts kept per MoE layer: {kept}")
    if "quality" in result.report:
        q = result.report["quality"]
        console.print(f"held-out ({q['tokens']} tokens): perplexity {q['perplexity']:.2f} (original "
                      f"{q['perplexity_original']:.2f}), KL {q['kl']:.4f}, top-1 agreement {q['top1']:.3f}")
    if "lora" in result.report:
        lr = result.report["lora"]
        console.print(f"LoRA: calibration KL {lr['kl_calibration_before']:.4f} -> {lr['kl_calibration_after']:.4f}")
    if args.report:
        console.print(f"report: {args.report}")
    return 0


def inspect_cmd(args: argparse.Namespace) -> int:
    from edgemoe.inspect_model import summarize

    s = summarize(GGUFFile(args.model))
    console = Console()
    console.print(f"[bold]{s.path}[/bold]  arch={s.arch}  name={s.name!r}  layers={s.n_layers}  "
                  f"experts used per token={s.experts_used}")
    table = Table("layer", "experts", "expert types", "expert MiB", "low-rank matrices")
    for layer, n in enumerate(s.experts_per_layer):
        types = s.layer_types[layer] if layer < len(s.layer_types) else {}
        ranks = s.layer_ranks[layer] if layer < len(s.layer_ranks) else ()
        table.add_row(str(layer), (f"{n} of {s.original_experts}" if n < s.original_experts else str(n)) if n else "dense",
                      " ".join(f"{t}×{c}" for t, c in sorted(types.items())),
                      f"{s.layer_expert_bytes[layer] / 2**20:.2f}" if n else "",
                      f"{len(ranks)}, rank {min(ranks)}" + (f"–{max(ranks)}" if max(ranks) > min(ranks) else "")
                      if ranks else "")
    console.print(table)
    console.print("types: " + ", ".join(f"{k}×{v}" for k, v in sorted(s.type_counts.items())))
    total = s.expert_bytes + s.dense_bytes
    console.print(f"bytes: experts {s.expert_bytes / 2**20:.2f} MiB ({100 * s.expert_bytes / max(total, 1):.0f}%), "
                  f"dense {s.dense_bytes / 2**20:.2f} MiB")
    console.print(f"stock llama.cpp: {'yes' if s.stock_loadable else 'no'} ({s.stock_reason})")
    return 0


def upgrade_cmd(args: argparse.Namespace) -> int:
    from edgemoe.legacy import upgrade

    n = upgrade(args.model, args.output)
    Console(stderr=True).print(f"wrote {args.output}: {n} per-expert tensor groups merged into 3-D expert tensors "
                               "(bytes unchanged); it loads in llama.cpp and in the edgemoe engine")
    return 0
