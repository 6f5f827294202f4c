"""Pieces every command family shares: the model path, engine options, budgets, prompt files."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from edgemoe.errors import InputError
from edgemoe.gguf_file import GGUFFile

if TYPE_CHECKING:
    from edgemoe.engine import EngineConfig


def model_path(path):
    """The model file a command runs: the one given, or the embedded demo model."""
    if path is not None:
        return path
    from edgemoe.demo import demo_gguf
    return demo_gguf()


def expert_bytes_total(path, backend: str = "edgemoe") -> int:
    """Every expert's bytes as `backend` counts them against a budget, so `--budget 100%` holds
    them all: the engine's buffers, or the budgeted llama mode's page-rounded slots and edges
    (where 100% runs llama.cpp's default layout: edgemoe/llama_full.py)."""
    from edgemoe.expert_store import find_experts
    from edgemoe.layout import is_extended

    model = GGUFFile(path)
    if backend == "llama" and not is_extended(model):  # llama.cpp refuses an extended file at open, saying why
        from edgemoe.llama_budget import budget_range

        return budget_range(path)[1]
    return sum(s.alloc_bytes for s in find_experts(model).values())


class PromptFileError(InputError):
    """A --prompts file that is missing, unreadable, not UTF-8 or holds no prompt."""


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file (what `python -m edgemoe.predictor.prompts` writes)."""
    from edgemoe.text import read_user_text

    text = read_user_text(path, "prompt file", PromptFileError, "a UTF-8 text file with one prompt per line")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompt; write one prompt per line")
    return prompts


def engine_config(args: argparse.Namespace, path) -> "EngineConfig":
    """--budget/--policy/--trace/--prefetch/--threads/--ctx -> EngineConfig."""
    from edgemoe.engine import EngineConfig
    from edgemoe.memory import parse_budget

    budget = None
    if args.budget:
        budget = parse_budget(args.budget, lambda: expert_bytes_total(path, getattr(args, "backend", "edgemoe")))
    if getattr(args, "max_memory", None):
        budget = budget_under_cap(args, path, args.max_memory)
    future = None
    if args.policy == "belady":
        if args.trace is None:
            raise InputError("--policy belady needs --trace TRACE (the future accesses); record one with `edgemoe trace`")
        from edgemoe.trace import Trace
        future = tuple(Trace.load(args.trace).demand_sequence())
    prefetch, predictor, predictor_path = prefetch_choice(args)
    return EngineConfig(budget_bytes=budget, policy=args.policy, prefetch=prefetch,
                        n_threads=args.threads, n_ctx=args.ctx, seed=getattr(args, "seed", 0), future=future,
                        kv_type=getattr(args, "kv_type", "f16"),
                        dual_low_type=getattr(args, "dual_low", None),
                        dual_load_above=getattr(args, "dual_load_above", 0.5),
                        dual_background_load=getattr(args, "dual_background_load", False),
                        predictor=predictor, predictor_path=predictor_path)


def budget_under_cap(args: argparse.Namespace, path, cap: str) -> int:
    """--max-memory CAP -> the largest expert budget that fits (edgemoe/memory_cap.py), said on stderr."""
    import sys

    from edgemoe.memory import parse_bytes
    from edgemoe.memory_cap import budget_for_cap

    if args.budget:
        raise InputError("give --budget or --max-memory, not both (--max-memory picks the budget)")
    cap_bytes = parse_bytes(cap)
    budget, plan = budget_for_cap(path, cap_bytes, getattr(args, "backend", "edgemoe"), args.ctx)
    print(f"[--max-memory {cap_bytes / 2**20:.0f} MiB: expert budget {budget / 2**20:.0f} MiB; "
          f"{plan.explain(budget)}]", file=sys.stderr)
    return budget


def prefetch_choice(args: argparse.Namespace) -> tuple[bool, str, str | None]:
    """--prefetch / --predictor NAME|FILE -> (EngineConfig.prefetch, .predictor, .predictor_path):
    a given predictor implies --prefetch (a FILE is the learned one); without one, the default."""
    from edgemoe.predictor.base import DEFAULT_PREDICTOR, PREDICTORS

    value = getattr(args, "predictor", None)
    if value is None:
        return args.prefetch, DEFAULT_PREDICTOR, None
    return (True, str(value), None) if str(value) in PREDICTORS else (True, "learned", str(value))


def routing_tap(path):
    from edgemoe.llama_backend import RoutingTap

    model = GGUFFile(path)
    return RoutingTap(int(model.arch_field("expert_used_count", 1)), int(model.arch_field("expert_count", 1)))


@contextlib.contextmanager
def write_progress(console, first: str = "converting"):
    """A byte progress bar on `console` for writing a model file, gone when done; yields
    (on_progress(done, total, tensor name), on_stage(text)) as the converters take them."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(first, total=None)

        def on_progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name[:32].ljust(32))

        yield on_progress, lambda text: bar.update(task, description=text)


@contextlib.contextmanager
def load_progress(backend: str = "edgemoe"):
    """A progress bar on stderr for what a backend reads at open: the experts the engine loads
    when the budget holds them all (~10 s for a 5 GiB slice here), llama.cpp's load of the file
    (`backend="llama"`); yields the `on_progress(done, total)` callback both take. Only on a
    terminal: piped stderr (scripts, tests) gets nothing, and the bar is gone once loaded."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    what = "loading experts" if backend == "edgemoe" else "loading model"
    console = Console(stderr=True)
    with Progress(TextColumn(what), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
