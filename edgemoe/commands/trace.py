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
    """Each trace (a file, or every trace in a folder) through each policy at each budget; with
    several traces also the sum over them ("overall", each trace at its own share of its bytes)."""
    from edgemoe.memory import parse_budget
    from edgemoe.trace import load_traces

    traces = load_traces(args.trace)
    specs = args.budget or ["25%", "50%", "75%"]
    budgets = {path: [parse_budget(b, sum(t.expert_bytes.values())) for b in specs] for path, t in traces}
    console = Console(width=160)
    for path, t in traces:
        decoded = sum(1 for i, n in enumerate(t.tokens_per_step()) if n == 1 and i >= args.score_from)
        skipped = f" and steps before {args.score_from}" if args.score_from else ""
        console.print(f"{path}: {len(t.steps)} steps, {decoded} decode steps counted (prompt prefills{skipped} "
                      f"replayed, not counted); all experts = {sum(t.expert_bytes.values()) / 2**20:.1f} MiB")
    if args.compare_predictors or args.predictor is not None:
        return _compare_predictors(args, traces, specs, budgets, console)
    from edgemoe.policies import POLICIES
    from edgemoe.simulate import simulate, total

    policies = [p for p in args.policy or POLICIES if p != "belady"] + ["belady"]
    table = Table("trace", "budget", "share", "policy", "hit %", "misses", "MiB read/token", "misses vs belady")
    for j, spec in enumerate(specs):
        by_policy: dict[str, list] = {p: [] for p in policies}
        for path, t in traces:
            budget, all_bytes = budgets[path][j], sum(t.expert_bytes.values())
            for p in policies:
                by_policy[p].append(simulate(t, budget, p, score_from=args.score_from))
            _policy_rows(table, path.name, f"{budget / 2**20:.1f} MiB", f"{100 * budget / all_bytes:.0f}%",
                         {p: rs[-1] for p, rs in by_policy.items()})
        if len(traces) > 1:
            _policy_rows(table, "overall", "each trace's", spec, {p: total(rs) for p, rs in by_policy.items()})
        table.add_section()
    console.print(table)
    return 0


def _policy_rows(table: Table, name: str, budget: str, share: str, results: dict) -> None:
    best = max(results["belady"].misses, 1)
    for p, r in results.items():
        table.add_row(name, budget, share, p, f"{100 * r.hit_rate:.1f}", str(r.misses),
                      f"{r.bytes_per_token / 2**20:.3f}", f"{r.misses / best:.2f}x")


def _compare_predictors(args: argparse.Namespace, traces, specs: list[str], budgets: dict, console) -> int:
    from edgemoe.bench.predictor_compare import combine, compare_predictors
    from edgemoe.bench.predictor_report import add_compare_rows, compare_table
    from edgemoe.policies import DEFAULT_POLICY

    policy = (args.policy or [DEFAULT_POLICY])[0]
    tables = {path.name: compare_table() for path, _ in traces}
    overall, notes = compare_table(), []
    for j, spec in enumerate(specs):
        per_trace = []
        for path, t in traces:
            rows = compare_predictors(t, budgets[path][j], predictor_file=args.predictor, policy=policy,
                                      score_from=args.score_from)
            notes += add_compare_rows(tables[path.name], rows, sum(t.expert_bytes.values()))
            per_trace.append(rows)
        if len(traces) > 1:
            add_compare_rows(overall, [combine(list(rows)) for rows in zip(*per_trace)], 0, spec)
    for name, table in tables.items():
        table.title = f"{name}: precision/recall over every (token, MoE layer) target; belady = demand-only optimum"
        console.print(table)
    if len(traces) > 1:
        overall.title = "overall: counts summed over the traces, each at its own share"
        console.print(overall)
    for note in dict.fromkeys(notes):
        console.print(f"[yellow]{note}[/yellow]")
    return 0
