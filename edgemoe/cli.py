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
    g.add_argument("--backend", choices=["llama"], default="llama",
                   help="llama: stock llama.cpp through llama-cpp-python")
    g.set_defaults(func=commands.generate_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted; no partial output was kept", file=sys.stderr)
        return 130
    except commands.USER_ERRORS as exc:
        print(f"edgemoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
