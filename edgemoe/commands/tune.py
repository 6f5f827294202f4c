"""`edgemoe tune` and `--profile`: which settings run fastest here, and using them."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from edgemoe.commands.common import model_path, read_prompts

_PROFILE_OPTIONS = {"budget": "--budget", "policy": "--policy", "prefetch": "--prefetch", "threads": "--threads",
                    "ctx": "--ctx"}


def apply_profile(args: argparse.Namespace, argv: list[str]) -> None:
    """--profile FILE: the tuned model and engine settings, except options given on the command line."""
    from edgemoe.tune.profile import ProfileError, load_profile

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
    from edgemoe.memory import parse_bytes, parse_shares
    from edgemoe.tune.sweep import DEFAULT_PROMPTS, DEFAULT_SHARES, TuneOptions, tune
    from edgemoe.tune.plot import terminal_plot
    from edgemoe.tune.report import RichProgress, summary, table, trace_table, write_outputs

    path = Path(model_path(args.model))
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = tuple(read_prompts(args.prompts))
    confirm = -1 if args.confirm.strip().lower() == "all" else int(args.confirm)
    shares = parse_shares(args.budgets) if args.budgets else DEFAULT_SHARES
    out = args.out or Path(f"tune-{path.stem}")
    opts = TuneOptions(path, prompts, args.tokens, parse_bytes(args.max_memory) if args.max_memory else None, shares,
                       confirm=confirm, repeats=args.repeats, tolerance=args.tolerance / 100, threads=args.threads,
                       ctx=args.ctx, work_dir=out, traces=args.traces)
    console = Console(width=max(Console().width, 160))
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        res = tune(opts, RichProgress(bar))
    console.print(table(res, args.all))
    per_trace = trace_table(res)
    if per_trace is not None:
        console.print(per_trace)
    if res.rows and res.cost:
        console.print(terminal_plot(res), highlight=False)
    for line in summary(res):
        console.print(line, highlight=False)
    for kind, written in write_outputs(res, out).items():
        console.print(f"wrote {kind}: {written}", highlight=False)
    if res.recommended:
        console.print(f"use it: edgemoe generate --profile {out / 'profile.yaml'} -p \"...\"", highlight=False)
    return 130 if res.interrupted else 1 if res.failed else 0
