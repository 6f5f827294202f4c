"""`edgemoe generate` and `chat`: text from a model, on either backend."""
from __future__ import annotations

import argparse
import sys

from edgemoe.commands.common import engine_config, model_path, routing_tap


def generate_cmd(args: argparse.Namespace) -> int:
    path = model_path(args.model)
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


def _generate_llama(args: argparse.Namespace, path) -> int:
    from edgemoe.llama_backend import open_llama, stream_generate

    tap = routing_tap(path) if args.stats else None
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


def chat_cmd(args: argparse.Namespace) -> int:
    from edgemoe.tui import open_backend, run_chat
    from edgemoe.tui.prompt import read_sampling

    sampling = read_sampling(str(args.temperature), str(args.top_p), str(args.max_tokens), args.ctx)
    path = model_path(args.model)
    run_chat(open_backend(path, args.backend, engine_config(args, path)), sampling)
    return 0
