"""`edgemoe generate` and `chat`: text from a model, on either backend."""
from __future__ import annotations

import argparse
import sys

from edgemoe.commands.common import engine_config, load_progress, model_path, routing_tap
from edgemoe.errors import InputError


def generate_cmd(args: argparse.Namespace) -> int:
    path = model_path(args.model)
    config = engine_config(args, path)
    gpu_layers = getattr(args, "gpu_layers", 0)
    if args.backend == "llama" and config.budget_bytes is None and not gpu_layers:
        return _generate_llama(args, path)  # stock llama.cpp: the baseline
    if args.backend == "llama":
        from edgemoe.llama_budget import BudgetedLlama, budgeted_config

        with load_progress("llama") as on_progress:
            runtime, label = BudgetedLlama(path, budgeted_config(config, gpu_layers), on_progress), "llama + edgemoe cache"
        events = runtime.stream_generate(args.prompt, args.max_tokens, args.temperature)
    else:
        if gpu_layers:
            raise InputError("--gpu-layers is for --backend llama (llama.cpp's GPU builds)")
        from edgemoe.engine import Engine

        with load_progress() as on_progress:
            runtime, label = Engine(path, config, on_progress), "edgemoe"
        events = runtime.stream_generate(args.prompt, args.max_tokens, args.temperature)
    for warning in runtime.warnings:
        print(f"edgemoe generate: warning: {warning}", file=sys.stderr)
    try:
        _print_stream(args, events, label, getattr(runtime, "low_bytes", 0), runtime.cache.loader)
    finally:
        runtime.close()
    return 0


def _print_stream(args: argparse.Namespace, events, label: str, low_bytes: int, loader) -> None:
    sys.stdout.write(args.prompt)
    last, low = None, [0, 0]  # token x expert slots served low, all
    for event in events:
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
                f"low copies {low_bytes / 2**20:.1f} MiB" if low_bytes else "")
        reads = loader.stats()
        how = "native AIO" if loader.uses_aio else "reader threads"
        io = (f", expert reads {reads.bytes_read / 2**20:.0f} MiB at {reads.bandwidth_bps / 1e9:.2f} GB/s ({how})"
              if reads.reads else "")
        print(f"[{last.index + 1} tokens, {last.tokens_per_s:.1f} tokens/s, backend {label}, "
              f"peak RSS {last.peak_rss_bytes / 2**20:.0f} MiB{io}{dual}]", file=sys.stderr)


def _low_note(c) -> str:
    return f" low-served {c.low_served} ({c.low_token_slots}/{c.token_slots} slots)" if c.low_resident_bytes else ""


def _generate_llama(args: argparse.Namespace, path) -> int:
    from edgemoe.llama_backend import open_llama, stream_generate

    tap = routing_tap(path) if args.stats else None
    with load_progress("llama") as on_progress:
        llm = open_llama(path, seed=args.seed, n_ctx=args.ctx, routing=tap, n_threads=args.threads,
                         on_progress=on_progress)
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


def chat_cmd(args: argparse.Namespace) -> int:
    from edgemoe.tui import open_backend, run_chat
    from edgemoe.tui.prompt import read_sampling

    sampling = read_sampling(str(args.temperature), str(args.top_p), str(args.max_tokens), args.ctx)
    path = model_path(args.model)
    gpu_layers = getattr(args, "gpu_layers", 0)
    if gpu_layers and args.backend != "llama":
        raise InputError("--gpu-layers is for --backend llama (llama.cpp's GPU builds)")
    with load_progress(args.backend) as on_progress:
        backend = open_backend(path, args.backend, engine_config(args, path), gpu_layers=gpu_layers,
                               on_progress=on_progress)
    run_chat(backend, sampling)
    return 0
