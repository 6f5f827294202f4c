"""`edgemoe bench`, `eval` and `predictor train|bench`: measuring speed and quality."""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from rich.console import Console
from rich.table import Table

from edgemoe.commands.common import expert_bytes_total, model_path, read_prompts
from edgemoe.errors import InputError


def bench_cmd(args: argparse.Namespace) -> int:
    import json
    import os

    from edgemoe.bench.speed import rows_as_dicts, run_bench

    if args.max_memory is not None:
        return capped_bench_cmd(args)
    if getattr(args, "predictor", None) is not None:
        raise InputError("bench --predictor applies to the managed runs of --max-memory; "
                         "without a cap, --prefetch uses the default predictor")
    models = list(args.models)
    if not models:
        from edgemoe.demo import demo_gguf
        models.append(demo_gguf())
        if not args.no_slice:
            from edgemoe.models.mixtral_slice import write_mixtral_slice
            models.append(_slice(write_mixtral_slice, "mixtral", args.slice_layers or 2))
    from edgemoe.memory import parse_shares

    shares = list(parse_shares(args.budgets))
    threads = args.threads or os.cpu_count() or 1
    prompt = _bench_prompt(args.prompt_tokens)
    console = Console(width=200)  # the table is wide; wrapping it at 80 columns makes it unreadable
    table = Table("model", "backend", "budget", "prefill tok/s", "decode tok/s", "vs llama.cpp", "hit %",
                  "belady hit %", "MiB read/tok", "ms/tok dense|experts|token|stall|other", "other ms/layer/tok",
                  "peak RSS MiB")
    all_rows = []
    for path in models:
        rows = run_bench(Path(path), prompt, args.tokens, shares, threads, args.policy, args.prefetch, args.kv_type,
                         on_row=lambda r: console.print(f"  {r.model} {r.backend} {100 * r.budget_share:.0f}%: "
                                                        + (r.skipped or f"decode {r.decode_tps:.2f} tok/s"),
                                                        highlight=False))
        for r in rows:
            if r.skipped:
                table.add_row(r.model, r.backend, "", "", "", r.skipped)
                continue
            ms = "|".join(f"{r.ms_per_token[k]:.1f}" for k in ("dense", "experts", "token", "stall", "other")) \
                if r.ms_per_token else ""
            table.add_row(r.model, r.backend, f"{100 * r.budget_share:.0f}%", f"{r.prefill_tps:.1f}",
                          f"{r.decode_tps:.2f}", "n/a" if r.ratio_vs_llama is None else f"{r.ratio_vs_llama:.2f}x",
                          "" if r.hit_rate is None else f"{100 * r.hit_rate:.1f}",
                          "" if r.belady_hit_rate is None else f"{100 * r.belady_hit_rate:.1f}",
                          "" if r.mib_read_per_token is None else f"{r.mib_read_per_token:.2f}", ms,
                          f"{r.ms_per_token['other_per_layer']:.3f}" if r.ms_per_token else "",
                          f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib else "")
        table.add_section()
        all_rows += rows
    console.print(f"threads={threads} decode tokens={args.tokens} prompt tokens={args.prompt_tokens} "
                  f"policy={args.policy} prefetch={args.prefetch} kv={args.kv_type}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows_as_dicts(all_rows), indent=1))
    return 0


def capped_bench_cmd(args: argparse.Namespace) -> int:
    """Every backend configuration in its own memory cgroup, file page cache dropped first."""
    import json
    import os

    from edgemoe.bench.capped import CappedOptions, check_cgroups, parse_runs, run_capped
    from edgemoe.bench.capped_report import model_header, report_dict, result_line, results_table
    from edgemoe.bench.cgroup import CgroupError
    from edgemoe.commands.common import prefetch_choice
    from edgemoe.memory import parse_bytes

    try:
        check_cgroups(args.cgroup_root)
    except CgroupError as exc:
        print(f"edgemoe bench: cannot cap memory, nothing was run: {exc}", file=sys.stderr)
        return 2
    cap, runs, budget = parse_bytes(args.max_memory), parse_runs(args.runs), _capped_budget(args)
    models = list(args.models)
    if not models:
        from edgemoe.models.mixtral_slice import write_mixtral_slice
        from edgemoe.models.qwen3_slice import DEFAULT_LAYERS, write_qwen3_slice
        models = [_slice(write_mixtral_slice, "mixtral", args.slice_layers or 8),
                  _slice(write_qwen3_slice, "qwen3", DEFAULT_LAYERS)]
    prefetch, predictor, predictor_path = prefetch_choice(args)
    opts = CappedOptions(cap, _bench_prompt(args.prompt_tokens), args.tokens, args.threads or os.cpu_count() or 1,
                         args.prompt_tokens * 4 + args.tokens + 8, runs, budget_bytes=budget,
                         policy=args.policy, prefetch=prefetch, predictor=predictor, predictor_path=predictor_path,
                         reference=not args.no_reference, cgroup_root=args.cgroup_root)
    console = Console(width=260)  # 18 columns
    reports = run_capped([Path(m) for m in models], opts,
                         on_model=lambda rep: console.print(model_header(rep, cap), highlight=False),
                         on_result=lambda rep, r: console.print(result_line(rep, r), highlight=False))
    console.print(f"threads={opts.n_threads} decode tokens={args.tokens} prompt tokens~{args.prompt_tokens} "
                  f"policy={args.policy} prefetch={opts.prefetch} predictor={opts.predictor if opts.prefetch else '-'} "
                  f"cap={cap / 2**20:.0f} MiB")
    for rep in reports:
        console.print(model_header(rep, cap), highlight=False)
        console.print(results_table(rep))
    if args.json:
        from edgemoe.models.cache import write_atomic
        write_atomic(args.json, json.dumps([report_dict(r) for r in reports], indent=1))
    return 0


def _capped_budget(args: argparse.Namespace) -> int | None:
    if args.budget is None:
        return None
    from edgemoe.memory import parse_bytes

    if args.budget.strip().endswith("%"):
        raise InputError("--budget with --max-memory takes bytes (e.g. 1800MiB): one budget for every model")
    return parse_bytes(args.budget)


def _slice(write, arch: str, layers: int) -> Path:
    """The benchmark slice of `arch` with `layers` layers, built once into the cache."""
    from edgemoe.models.cache import cache_dir

    path = cache_dir("bench") / f"{arch}-slice-{layers}L-q4_k.gguf"
    if not path.exists():
        print(f"building the {arch} slice at {path} (once) ...", file=sys.stderr)
        write(path, layers, "q4_k")
    return path


def _bench_prompt(n_tokens: int) -> str:
    """Held-out demo-corpus text (real routing for the demo model), about n_tokens long."""
    from edgemoe.models.corpus import load_corpus

    text = " ".join(load_corpus().heldout)
    return text[: n_tokens * 4]


def eval_cmd(args: argparse.Namespace) -> int:
    from edgemoe.engine import EngineConfig
    from edgemoe.bench.quality import evaluate, token_windows
    from edgemoe.tokenizer import Tokenizer

    windows = None
    if args.text is not None:
        from edgemoe.converters.calib_text import calibration_text
        windows = token_windows(Tokenizer(args.reference), calibration_text(args.text).documents,
                                max_windows=args.windows)
    reports = evaluate(list(args.models), args.reference, windows, args.windows, EngineConfig(n_threads=args.threads))
    table = Table("model", "expert MiB", "perplexity", "KL vs ref (nats/tok)", "top-1 agreement")
    for r in reports:
        table.add_row(Path(r.path).name, f"{r.expert_bytes / 2**20:.2f}", f"{r.perplexity:.3f}", f"{r.kl:.5f}",
                      f"{100 * r.top1:.2f}%")
    console = Console()
    console.print(f"reference {args.reference}: perplexity {reports[0].reference_perplexity:.3f} on "
                  f"{reports[0].n_tokens} predicted tokens")
    console.print(table)
    return 0


def predictor_train_cmd(args: argparse.Namespace) -> int:
    import tempfile

    from edgemoe.predictor.base import PredictorError
    from edgemoe.predictor.embed import check_target, embed
    from edgemoe.predictor.train import train

    if args.output is None and args.embed is None:
        raise PredictorError("give -o FILE.onnx, --embed MODEL.gguf, or both")
    if args.embed is not None:
        check_target(args.embed, args.traces)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix=".edgemoe-predictor-") as tmp:
        out = args.output or Path(tmp) / "predictor.onnx"
        report = train(args.traces, out, horizon=args.horizon, hidden=args.hidden, epochs=args.epochs,
                       seed=args.seed, on_epoch=lambda e, loss: console.print(f"  epoch {e}: val loss {loss:.4f}"))
        precision = ", ".join(f"+{h + 1}: {100 * p:.1f}%" for h, p in enumerate(report.val_precision_at_k))
        where = [str(args.output)] if args.output else []
        if args.embed is not None:
            where.append(f"{args.embed} (embedded, {embed(args.embed, out) / 1024:.0f} KiB)")
    print(f"wrote {' and '.join(where)}: {report.samples} samples ({report.val_samples} validation), best epoch "
          f"{report.epochs}, val loss {report.val_loss:.4f}, top-k precision by layers ahead {precision}"
          f"{'' if report.use_logits else ' (no router look-ahead in the traces)'}, {report.seconds:.1f}s")
    return 0


def predictor_bench_cmd(args: argparse.Namespace) -> int:
    from edgemoe.bench.predictor_report import bench_table
    from edgemoe.bench.predictors import Contender, bench_predictors
    from edgemoe.memory import parse_budget
    from edgemoe.predictor.prompts import corpus_prompts

    path = model_path(args.model)
    total = expert_bytes_total(path)
    budget = parse_budget(args.budget, total)
    prompts = read_prompts(args.prompts) if args.prompts else corpus_prompts("heldout", 8)
    contenders = [Contender("off", "off"), Contender("router", "router"), Contender("prior", "prior")]
    if args.predictor is not None:
        contenders.append(Contender("learned", "learned", str(args.predictor)))
    console = Console(width=160)
    runs = bench_predictors(path, prompts, args.max_tokens, budget, contenders, args.policy, args.threads,
                            args.repeats, on_run=lambda r: console.print(f"  {r.label}: {r.decode_tps[-1]:.1f} tok/s",
                                                                           highlight=False))
    for r in runs:
        for warning in r.warnings:
            console.print(f"[yellow]{r.label}: {warning}[/yellow]")
    console.print(f"{path.name}: budget {budget / 2**20:.1f} MiB ({100 * budget / total:.0f}% of experts), policy "
                  f"{args.policy}, {len(prompts)} prompts x {args.max_tokens} tokens, {args.repeats} runs each")
    console.print(bench_table(runs))
    return 0 if all(r.tokens_identical for r in runs) else 1
