"""Plain functions behind each `edgemoe` subcommand (the CLI only parses arguments)."""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgemoe.converters.errors import ConvertError
from edgemoe.gguf_file import GGUFFile, ModelFileError



def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions shown as a one-line error (no traceback): bad input the user can fix."""
    from edgemoe.residency import BudgetError
    from edgemoe.trace import TraceError

    return (ConvertError, ModelFileError, BudgetError, TraceError, FileNotFoundError, PermissionError, ValueError)


def convert_cmd(args: argparse.Namespace) -> int:
    from edgemoe.converters.convert import convert

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("converting", total=None)

        def on_progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name[:32].ljust(32))

        if getattr(args, "mixed", False):
            return _convert_mixed(args, console, on_progress, lambda text: bar.update(task, description=text))
        if args.expert_bytes is not None or args.avg_bits is not None or args.calibration is not None:
            raise ValueError("--expert-bytes, --avg-bits and --calibration need --mixed")
        report = convert(args.hf_dir, args.output, args.type or "f16", on_progress=on_progress)
    console.print(f"wrote {report.path} ({report.architecture}, {report.n_tensors} tensors, "
                  f"{report.total_bytes / 2**20:.1f} MiB, experts {report.expert_bytes / 2**20:.1f} MiB) "
                  f"in {report.seconds:.1f}s")
    for name, used in report.fallbacks.items():
        console.print(f"  {name}: row length does not fit {args.type} blocks, stored as {used}")
    return 0


def _convert_mixed(args: argparse.Namespace, console: Console, on_progress, on_stage) -> int:
    from edgemoe.converters.mixed import convert_mixed

    r = convert_mixed(args.hf_dir, args.output, args.expert_bytes, args.avg_bits, args.type or "q8_0",
                      args.calibration, imatrix=args.imatrix, n_tokens=args.calibration_tokens,
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
    from edgemoe.converters.compress.pipeline import compress, prepare, write_report

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


def _model_path(path):
    if path is not None:
        return path
    from edgemoe.demo import demo_gguf
    return demo_gguf()


def engine_config(args: argparse.Namespace, model_path) -> "EngineConfig":
    """--budget/--policy/--trace/--prefetch/--threads/--ctx -> EngineConfig."""
    from edgemoe.engine import EngineConfig
    from edgemoe.expert_store import find_experts
    from edgemoe.memory import parse_bytes

    budget = None
    if args.budget:
        if args.budget.strip().endswith("%"):
            total = sum(s.alloc_bytes for s in find_experts(GGUFFile(model_path)).values())
            budget = int(total * float(args.budget.strip()[:-1]) / 100)
        else:
            budget = parse_bytes(args.budget)
    future = None
    if args.policy == "belady":
        if args.trace is None:
            raise ValueError("--policy belady needs --trace TRACE (the future accesses); record one with `edgemoe trace`")
        from edgemoe.trace import Trace
        future = tuple(Trace.load(args.trace).demand_sequence())
    predictor, predictor_path = _predictor_choice(getattr(args, "predictor", None))
    return EngineConfig(budget_bytes=budget, policy=args.policy, prefetch=args.prefetch or predictor is not None,
                        n_threads=args.threads, n_ctx=args.ctx, seed=getattr(args, "seed", 0), future=future,
                        dual_low_type=getattr(args, "dual_low", None),
                        dual_load_above=getattr(args, "dual_load_above", 0.5),
                        dual_background_load=getattr(args, "dual_background_load", False),
                        predictor=predictor or "router", predictor_path=predictor_path)


def _predictor_choice(value) -> tuple[str | None, str | None]:
    """--predictor NAME|FILE -> (EngineConfig.predictor, predictor_path); (None, None) if not given."""
    from edgemoe.predictor.base import PREDICTORS

    if value is None:
        return None, None
    return (str(value), None) if str(value) in PREDICTORS else ("learned", str(value))


def generate_cmd(args: argparse.Namespace) -> int:
    path = _model_path(args.model)
    if args.backend == "llama":
        return _generate_llama(args, path)
    from edgemoe.engine import Engine

    engine = Engine(path, engine_config(args, path))
    for warning in engine.warnings:
        print(f"edgemoe generate: warning: {warning}", file=sys.stderr)
    try:
        sys.stdout.write(args.prompt)
        last, low = None, [0, 0]  # token x expert slots served low, all
        for event in engine.stream_generate(args.prompt, args.max_tokens, args.temperature):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if args.stats:
                c = event.cache
                print(f"\n[token {event.index}: hits {c.hits} misses {c.misses} read {c.bytes_read / 2**20:.2f} MiB "
                      f"stall {c.stall_s * 1e3:.1f} ms resident {c.resident_bytes / 2**20:.1f}/"
                      f"{c.budget_bytes / 2**20:.1f} MiB{_low_note(c)}]", file=sys.stderr)
            low[0] += event.cache.low_token_slots
            low[1] += event.cache.token_slots
            last = event
        sys.stdout.write("\n")
        if last:
            dual = (f", served low {low[0]} of {low[1]} token x expert slots ({100 * low[0] / max(low[1], 1):.1f}%), "
                    f"low copies {engine.low_bytes / 2**20:.1f} MiB" if engine.low_bytes else "")
            print(f"[{last.index + 1} tokens, {last.tokens_per_s:.1f} tokens/s, backend edgemoe, "
                  f"peak RSS {last.peak_rss_bytes / 2**20:.0f} MiB{dual}]", file=sys.stderr)
    finally:
        engine.close()
    return 0


def _low_note(c) -> str:
    return f" low-served {c.low_served} ({c.low_token_slots}/{c.token_slots} slots)" if c.low_resident_bytes else ""


def eval_cmd(args: argparse.Namespace) -> int:
    from edgemoe.engine import EngineConfig
    from edgemoe.quality import evaluate, token_windows
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


def chat_cmd(args: argparse.Namespace) -> int:
    from edgemoe.tui import open_backend, run_chat
    from edgemoe.tui.prompt import read_sampling

    sampling = read_sampling(str(args.temperature), str(args.top_p), str(args.max_tokens), args.ctx)
    path = _model_path(args.model)
    run_chat(open_backend(path, args.backend, engine_config(args, path)), sampling)
    return 0


def _routing_tap(path):
    from edgemoe.llama_backend import RoutingTap

    model = GGUFFile(path)
    return RoutingTap(int(model.arch_field("expert_used_count", 1)), int(model.arch_field("expert_count", 1)))


def _generate_llama(args: argparse.Namespace, path) -> int:
    from edgemoe.llama_backend import open_llama, stream_generate

    tap = _routing_tap(path) if args.stats else None
    llm = open_llama(path, seed=args.seed, n_ctx=args.ctx, routing=tap, n_threads=args.threads)
    sys.stdout.write(args.prompt)
    last = None
    for event in stream_generate(llm, args.prompt, args.max_tokens, args.temperature, routing=tap):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        if args.stats:
            print(f"\n[token {event.index}: experts per layer {list(event.routing)}]", file=sys.stderr)
        last = event
    sys.stdout.write("\n")
    if last:
        print(f"[{last.index + 1} tokens, {last.tokens_per_s:.1f} tokens/s, backend llama]", file=sys.stderr)
    return 0


def trace_cmd(args: argparse.Namespace) -> int:
    from edgemoe.engine import Engine
    from edgemoe.trace import TraceRecorder

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += [line for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one prompt with -p or --prompts FILE")
    path = _model_path(args.model)
    if args.backend == "llama":
        trace = _trace_llama(path, prompts, args.max_tokens)
    else:
        engine = Engine(path)
        try:
            recorder = TraceRecorder(engine, router_logits=not args.no_router_logits)
            for prompt in prompts:
                for _ in engine.stream_generate(prompt, args.max_tokens, stop_at_eos=False):
                    pass
            trace = recorder.detach()
        finally:
            engine.close()
    trace.save(args.output)
    print(f"wrote {args.output}: {len(trace.steps)} steps, {sum(trace.tokens_per_step())} tokens, "
          f"{len(trace.moe_layers)} MoE layers x {trace.n_experts} experts")
    return 0


def _trace_llama(path, prompts: list[str], max_tokens: int):
    from edgemoe.expert_store import stock_experts
    from edgemoe.llama_backend import open_llama, stream_generate
    from edgemoe.trace import Trace

    model = GGUFFile(path)
    specs = stock_experts(model)
    tap = _routing_tap(path)
    llm = open_llama(path, routing=tap)
    for prompt in prompts:
        for _ in stream_generate(llm, prompt, max_tokens, routing=tap):
            pass
    tap.flush()
    layers = sorted({layer for layer, _ in specs})
    return Trace(model.path.name, tap.n_expert, tap.top_k, layers, {k: s.alloc_bytes for k, s in specs.items()},
                 tap.steps)


def simulate_cmd(args: argparse.Namespace) -> int:
    from edgemoe.memory import parse_bytes
    from edgemoe.policies import POLICIES
    from edgemoe.simulate import simulate
    from edgemoe.trace import Trace

    trace = Trace.load(args.trace)
    total = sum(trace.expert_bytes.values())
    budgets = []
    for b in args.budget or ["25%", "50%", "75%"]:
        budgets.append(int(total * float(b[:-1]) / 100) if b.endswith("%") else parse_bytes(b))
    if args.compare_predictors or args.predictor is not None:
        return _compare_predictors(args, trace, budgets, total)
    policies = args.policy or list(POLICIES)
    table = Table("budget", "share", "policy", "hit %", "MiB read/token", "misses vs belady")
    for budget in budgets:
        results = {p: simulate(trace, budget, p) for p in policies}
        best = simulate(trace, budget, "belady")
        for p, r in results.items():
            table.add_row(f"{budget / 2**20:.1f} MiB", f"{100 * budget / total:.0f}%", p, f"{100 * r.hit_rate:.1f}",
                          f"{r.bytes_per_token / 2**20:.3f}", f"{r.misses / max(best.misses, 1):.2f}x")
        table.add_section()
    console = Console()
    decoded = sum(1 for n in trace.tokens_per_step() if n == 1)
    console.print(f"{args.trace}: {len(trace.steps)} steps, {decoded} decode steps counted (prompt prefills "
                  f"replayed, not counted); all experts = {total / 2**20:.1f} MiB")
    console.print(table)
    return 0


def bench_cmd(args: argparse.Namespace) -> int:
    import json
    import os

    from edgemoe.bench import rows_as_dicts, run_bench

    models = list(args.models)
    if not models:
        from edgemoe.demo import demo_gguf
        models.append(demo_gguf())
        if not args.no_slice:
            from edgemoe.models.cache import cache_dir
            from edgemoe.models.mixtral_slice import write_mixtral_slice
            path = cache_dir("bench") / f"mixtral-slice-{args.slice_layers}L-q4_k.gguf"
            if not path.exists():
                print(f"building the Mixtral-shaped slice at {path} (once) ...", file=sys.stderr)
                write_mixtral_slice(path, args.slice_layers, "q4_k")
            models.append(path)
    shares = [float(x) / 100 for x in args.budgets.split(",")]
    threads = args.threads or os.cpu_count() or 1
    prompt = _bench_prompt(args.prompt_tokens)
    console = Console(width=200)  # the table is wide; wrapping it at 80 columns makes it unreadable
    table = Table("model", "backend", "budget", "prefill tok/s", "decode tok/s", "vs llama.cpp", "hit %",
                  "belady hit %", "MiB read/tok", "ms/tok dense|experts|stall|other", "peak RSS MiB")
    all_rows = []
    for path in models:
        rows = run_bench(Path(path), prompt, args.tokens, shares, threads, args.policy, args.prefetch,
                         on_row=lambda r: console.print(f"  {r.model} {r.backend} {100 * r.budget_share:.0f}%: "
                                                        f"decode {r.decode_tps:.2f} tok/s", highlight=False))
        for r in rows:
            ms = "|".join(f"{r.ms_per_token[k]:.1f}" for k in ("dense", "experts", "stall", "other")) \
                if r.ms_per_token else ""
            table.add_row(r.model, r.backend, f"{100 * r.budget_share:.0f}%", f"{r.prefill_tps:.1f}",
                          f"{r.decode_tps:.2f}", f"{r.ratio_vs_llama:.2f}x",
                          "" if r.hit_rate is None else f"{100 * r.hit_rate:.1f}",
                          "" if r.belady_hit_rate is None else f"{100 * r.belady_hit_rate:.1f}",
                          "" if r.mib_read_per_token is None else f"{r.mib_read_per_token:.2f}", ms,
                          f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib else "")
        table.add_section()
        all_rows += rows
    console.print(f"threads={threads} decode tokens={args.tokens} prompt tokens={args.prompt_tokens} "
                  f"policy={args.policy} prefetch={args.prefetch}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows_as_dicts(all_rows), indent=1))
    return 0


def _bench_prompt(n_tokens: int) -> str:
    """Held-out demo-corpus text (real routing for the demo model), about n_tokens long."""
    from edgemoe.models.corpus import load_corpus

    text = " ".join(load_corpus().heldout)
    return text[: n_tokens * 4]


def _compare_predictors(args: argparse.Namespace, trace, budgets: list[int], total: int) -> int:
    from edgemoe.predictor.compare import compare_predictors
    from edgemoe.predictor.report import add_compare_rows, compare_table

    table, notes = compare_table(), []
    for budget in budgets:
        rows = compare_predictors(trace, budget, predictor_file=args.predictor, policy=(args.policy or ["lru"])[0])
        notes += add_compare_rows(table, rows, total)
    console = Console(width=160)
    decoded = sum(1 for n in trace.tokens_per_step() if n == 1)
    console.print(f"{args.trace}: {decoded} decode steps counted; precision/recall over every (token, MoE layer) "
                  "target; belady = demand-only optimum")
    console.print(table)
    for note in dict.fromkeys(notes):
        console.print(f"[yellow]{note}[/yellow]")
    return 0


def predictor_train_cmd(args: argparse.Namespace) -> int:
    from edgemoe.predictor.train import train

    console = Console(stderr=True)
    report = train(args.traces, args.output, horizon=args.horizon, hidden=args.hidden, epochs=args.epochs,
                   seed=args.seed, on_epoch=lambda e, loss: console.print(f"  epoch {e}: val loss {loss:.4f}"))
    precision = ", ".join(f"+{h + 1}: {100 * p:.1f}%" for h, p in enumerate(report.val_precision_at_k))
    print(f"wrote {report.path}: {report.samples} samples ({report.val_samples} validation), best epoch "
          f"{report.epochs}, val loss {report.val_loss:.4f}, top-k precision by layers ahead {precision}"
          f"{'' if report.use_logits else ' (no router look-ahead in the traces)'}, {report.seconds:.1f}s")
    return 0


def predictor_bench_cmd(args: argparse.Namespace) -> int:
    from edgemoe.expert_store import find_experts
    from edgemoe.memory import parse_bytes
    from edgemoe.predictor.bench import Contender, bench_predictors
    from edgemoe.predictor.prompts import corpus_prompts
    from edgemoe.predictor.report import bench_table

    path = _model_path(args.model)
    total = sum(s.alloc_bytes for s in find_experts(GGUFFile(path)).values())
    b = args.budget.strip()
    budget = int(total * float(b[:-1]) / 100) if b.endswith("%") else parse_bytes(b)
    prompts = ([line for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
               if args.prompts else corpus_prompts("heldout", 8))
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


# ---- edgemoe tune and --profile ------------------------------------------------------------
_PROFILE_OPTIONS = {"budget": "--budget", "policy": "--policy", "prefetch": "--prefetch", "threads": "--threads",
                    "ctx": "--ctx"}


def apply_profile(args: argparse.Namespace, argv: list[str]) -> None:
    """--profile FILE: the tuned model and engine settings, except options given on the command line."""
    from edgemoe.profile import ProfileError, load_profile

    profile = load_profile(args.profile)
    if args.model is None:
        if not Path(profile.model).exists():
            raise ProfileError(f"profile {args.profile}: field 'model' names {profile.model}, which does not exist; "
                               "give the model file as MODEL or run `edgemoe tune` again")
        args.model = Path(profile.model)
    else:
        profile.check_model(args.model, f"profile {args.profile}")
    given = {dest for dest, flag in _PROFILE_OPTIONS.items()
             if any(a == flag or a.startswith(flag + "=") for a in argv)}
    values = {"budget": str(profile.budget_bytes), "policy": profile.policy, "prefetch": profile.prefetch,
              "threads": profile.threads, "ctx": profile.ctx}
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, value)


def tune_cmd(args: argparse.Namespace) -> int:
    from edgemoe.memory import parse_bytes
    from edgemoe.tune import DEFAULT_PROMPTS, DEFAULT_SHARES, TuneOptions, tune
    from edgemoe.tune_plot import terminal_plot
    from edgemoe.tune_report import RichProgress, summary, table, write_outputs

    path = Path(_model_path(args.model))
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = tuple(line for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip())
        if not prompts:
            raise ValueError(f"{args.prompts} holds no prompt (one per line)")
    confirm = -1 if args.confirm.strip().lower() == "all" else int(args.confirm)
    shares = tuple(float(x) / 100 for x in args.budgets.split(",")) if args.budgets else DEFAULT_SHARES
    out = args.out or Path(f"tune-{path.stem}")
    opts = TuneOptions(path, prompts, args.tokens, parse_bytes(args.max_memory) if args.max_memory else None, shares,
                       confirm=confirm, repeats=args.repeats, tolerance=args.tolerance / 100, threads=args.threads,
                       ctx=args.ctx, work_dir=out)
    console = Console(width=max(Console().width, 160))
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        res = tune(opts, RichProgress(bar))
    console.print(table(res, args.all))
    if res.rows and res.cost:
        console.print(terminal_plot(res), highlight=False)
    for line in summary(res):
        console.print(line, highlight=False)
    for kind, written in write_outputs(res, out).items():
        console.print(f"wrote {kind}: {written}", highlight=False)
    if res.recommended:
        console.print(f"use it: edgemoe generate --profile {out / 'profile.yaml'} -p \"...\"", highlight=False)
    return 130 if res.interrupted else 1 if res.failed else 0
