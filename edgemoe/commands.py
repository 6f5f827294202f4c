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

        report = convert(args.hf_dir, args.output, args.type, on_progress=on_progress)
    console.print(f"wrote {report.path} ({report.architecture}, {report.n_tensors} tensors, "
                  f"{report.total_bytes / 2**20:.1f} MiB, experts {report.expert_bytes / 2**20:.1f} MiB) "
                  f"in {report.seconds:.1f}s")
    for name, used in report.fallbacks.items():
        console.print(f"  {name}: row length does not fit {args.type} blocks, stored as {used}")
    return 0


def inspect_cmd(args: argparse.Namespace) -> int:
    from edgemoe.inspect_model import summarize

    s = summarize(GGUFFile(args.model))
    console = Console()
    console.print(f"[bold]{s.path}[/bold]  arch={s.arch}  name={s.name!r}  layers={s.n_layers}  "
                  f"experts used per token={s.experts_used}")
    table = Table("layer", "experts")
    for layer, n in enumerate(s.experts_per_layer):
        table.add_row(str(layer), str(n) if n else "dense")
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
    from edgemoe.expert_store import stock_experts
    from edgemoe.memory import parse_bytes

    budget = None
    if args.budget:
        if args.budget.strip().endswith("%"):
            total = sum(s.alloc_bytes for s in stock_experts(GGUFFile(model_path)).values())
            budget = int(total * float(args.budget.strip()[:-1]) / 100)
        else:
            budget = parse_bytes(args.budget)
    future = None
    if args.policy == "belady":
        if args.trace is None:
            raise ValueError("--policy belady needs --trace TRACE (the future accesses); record one with `edgemoe trace`")
        from edgemoe.trace import Trace
        future = tuple(Trace.load(args.trace).demand_sequence())
    return EngineConfig(budget_bytes=budget, policy=args.policy, prefetch=args.prefetch, n_threads=args.threads,
                        n_ctx=args.ctx, seed=getattr(args, "seed", 0), future=future)


def generate_cmd(args: argparse.Namespace) -> int:
    path = _model_path(args.model)
    if args.backend == "llama":
        return _generate_llama(args, path)
    from edgemoe.engine import Engine

    engine = Engine(path, engine_config(args, path))
    try:
        sys.stdout.write(args.prompt)
        last = None
        for event in engine.stream_generate(args.prompt, args.max_tokens, args.temperature):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if args.stats:
                c = event.cache
                print(f"\n[token {event.index}: hits {c.hits} misses {c.misses} read {c.bytes_read / 2**20:.2f} MiB "
                      f"stall {c.stall_s * 1e3:.1f} ms resident {c.resident_bytes / 2**20:.1f}/"
                      f"{c.budget_bytes / 2**20:.1f} MiB]", file=sys.stderr)
            last = event
        sys.stdout.write("\n")
        if last:
            print(f"[{last.index + 1} tokens, {last.tokens_per_s:.1f} tokens/s, backend edgemoe, "
                  f"peak RSS {last.peak_rss_bytes / 2**20:.0f} MiB]", file=sys.stderr)
    finally:
        engine.close()
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
            recorder = TraceRecorder(engine)
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
