"""`edgemoe trace` and `simulate`: record routing, replay it through the cache policies."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from edgemoe.commands.common import model_path, read_prompts, routing_tap
from edgemoe.errors import InputError
from edgemoe.gguf_file import GGUFFile


def trace_cmd(args: argparse.Namespace) -> int:
    from edgemoe.engine import Engine
    from edgemoe.trace import TraceRecorder

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise InputError("give at least one prompt with -p or --prompts FILE")
    path = model_path(args.model)
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
    tap = routing_tap(path)
    llm = open_llama(path, routing=tap)
    for prompt in prompts:
        for _ in stream_generate(llm, prompt, max_tokens, routing=tap):
            pass
    tap.flush()
    layers = sorted({layer for layer, _ in specs})
    return Trace(model.path.name, tap.n_expert, tap.top_k, layers, {k: s.alloc_bytes for k, s in specs.items()},
                 tap.steps)


def simulate_cmd(args: argparse.Namespace) -> int:
    from edgemoe.memory import parse_budget
    from edgemoe.policies import POLICIES
    from edgemoe.simulate import simulate
    from edgemoe.trace import Trace

    trace = Trace.load(args.trace)
    total = sum(trace.expert_bytes.values())
    budgets = [parse_budget(b, total) for b in args.budget or ["25%", "50%", "75%"]]
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


def _compare_predictors(args: argparse.Namespace, trace, budgets: list[int], total: int) -> int:
    from edgemoe.bench.predictor_compare import compare_predictors
    from edgemoe.bench.predictor_report import add_compare_rows, compare_table

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
