"""Plain functions behind each `edgemoe` subcommand (the CLI only parses arguments)."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgemoe.converters.errors import ConvertError
from edgemoe.gguf_file import GGUFFile, ModelFileError

USER_ERRORS = (ConvertError, ModelFileError, FileNotFoundError, PermissionError)


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


def generate_cmd(args: argparse.Namespace) -> int:
    from edgemoe.llama_backend import open_llama, stream_generate

    path = args.model
    if path is None:
        from edgemoe.demo import demo_gguf
        path = demo_gguf()
    llm = open_llama(path, seed=args.seed)
    sys.stdout.write(args.prompt)
    last = None
    for event in stream_generate(llm, args.prompt, args.max_tokens, args.temperature):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event
    sys.stdout.write("\n")
    if last:
        print(f"[{last.index + 1} tokens, {last.tokens_per_s:.1f} tokens/s, backend {args.backend}]", file=sys.stderr)
    return 0
