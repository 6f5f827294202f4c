"""The `edgemoe` command. Each subcommand parses its arguments and calls one plain function."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgemoe import commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe",
        description="Run big Mixture-of-Experts language models on a laptop.",
        epilog="Run `edgemoe COMMAND --help` for each command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint to GGUF",
                       description="Convert a Hugging Face MoE checkpoint folder (config.json, *.safetensors, "
                                   "tokenizer files) to a GGUF file in llama.cpp's stock layout. Tensors are "
                                   "streamed one at a time, so a model larger than RAM converts too.")
    c.add_argument("hf_dir", type=Path, help="checkpoint folder")
    c.add_argument("-o", "--output", type=Path, required=True, help="output .gguf path (written atomically)")
    c.add_argument("--type", default="f16",
                   help="tensor type: f32, f16, bf16, q8_0, q4_0, q2_k, q3_k, q4_k, q5_k, q6_k (default f16); "
                        "norms and routers stay f32, rows that do not fit a K-quant block fall back")
    c.set_defaults(func=commands.convert_cmd)

    i = sub.add_parser("inspect", help="show what a GGUF file holds",
                       description="Architecture, layers, experts per layer, tensor types, expert vs dense "
                                   "bytes, and whether stock llama.cpp can load the file.")
    i.add_argument("model", type=Path, help=".gguf file")
    i.set_defaults(func=commands.inspect_cmd)

    g = sub.add_parser("generate", help="generate text from a GGUF model",
                       description="Stream a continuation of a prompt. Without MODEL, the embedded demo model "
                                   "(a small MoE trained on Python's own documentation) is used.")
    g.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    g.add_argument("-p", "--prompt", default="The os module provides", help="prompt text")
    g.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", choices=["edgemoe", "llama"], default="edgemoe",
                   help="edgemoe: our engine with the budgeted expert cache (default); "
                        "llama: stock llama.cpp through llama-cpp-python")
    _engine_options(g)
    g.add_argument("--stats", action="store_true", help="print cache statistics per token to stderr")
    g.set_defaults(func=commands.generate_cmd)

    t = sub.add_parser("trace", help="record a routing trace (experts chosen per token and layer)",
                       description="Generate from each prompt with the edgemoe engine and record which experts "
                                   "every token chose in every MoE layer, for `edgemoe simulate`.")
    t.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    t.add_argument("-p", "--prompt", action="append", help="prompt (repeatable)")
    t.add_argument("--prompts", type=Path, help="text file, one prompt per line")
    t.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    t.add_argument("-o", "--output", type=Path, required=True, help="trace file to write (JSON)")
    t.add_argument("--backend", choices=["edgemoe", "llama"], default="edgemoe",
                   help="engine that runs the prompts (llama: read from llama.cpp's ffn_moe_topk tensors)")
    t.set_defaults(func=commands.trace_cmd)

    s = sub.add_parser("simulate", help="replay a routing trace through every cache policy and budget",
                       description="Hit rates and bytes read per token of each policy (lru, lfu, hybrid, random) "
                                   "next to Belady's offline optimum, without running the model.")
    s.add_argument("trace", type=Path, help="trace file from `edgemoe trace`")
    s.add_argument("--budget", action="append",
                   help="expert budget: bytes (2GB, 512MiB) or a share of all experts (50%%); repeatable "
                        "(default: 25%%, 50%%, 75%%)")
    s.add_argument("--policy", action="append", help="policy to replay (repeatable; default: all)")
    s.set_defaults(func=commands.simulate_cmd)
    b = sub.add_parser("bench", help="edgemoe vs llama.cpp tokens/s on the same GGUF, at several budgets",
                       description="Prefill and decode tokens/s of llama.cpp and of the edgemoe engine at full "
                                   "expert budget and at smaller shares, measured side by side in one run; hit "
                                   "rate vs Belady; ms per token by part. Default models: the demo model and a "
                                   "Mixtral-shaped slice (true Mixtral dims, random Q4_K weights, built once).")
    b.add_argument("models", type=Path, nargs="*", help=".gguf files (default: demo + Mixtral slice)")
    b.add_argument("--slice-layers", type=int, default=2, help="layers of the Mixtral-shaped slice (default 2)")
    b.add_argument("--no-slice", action="store_true", help="skip the Mixtral-shaped slice")
    b.add_argument("--budgets", default="100,75,50,25", help="expert budgets in %% of all expert bytes")
    b.add_argument("-n", "--tokens", type=int, default=32, help="decode tokens per run (default 32)")
    b.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for prefill (default 64)")
    b.add_argument("--policy", default="lru")
    b.add_argument("--prefetch", action="store_true")
    b.add_argument("--threads", type=int, default=None, help="threads for both backends (default: all cores)")
    b.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    b.set_defaults(func=commands.bench_cmd)
    return p


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default=None,
                   help="expert cache budget: bytes (2GB, 512MiB) or a share of all experts (50%%); "
                        "default: all experts fit")
    p.add_argument("--policy", default="lru", help="eviction policy: lru, lfu, hybrid, random, belady (default lru)")
    p.add_argument("--trace", type=Path, default=None, help="routing trace giving Belady's future accesses")
    p.add_argument("--prefetch", action="store_true", help="prefetch the next layer's predicted experts")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=512, help="context length in tokens (default 512)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted; no partial output was kept", file=sys.stderr)
        return 130
    except commands.user_errors() as exc:
        print(f"edgemoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
