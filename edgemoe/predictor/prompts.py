"""Prompts from the demo corpus for recording predictor traces: one line per document, the
document's first `chars` characters with whitespace collapsed. Train traces come from the train
split, evaluation traces from the held-out split (never seen by the demo model or the predictor).

    python -m edgemoe.predictor.prompts --split train --count 200 -o train_prompts.txt
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path


def corpus_prompts(split: str, count: int, chars: int = 160, seed: int = 0) -> list[str]:
    from edgemoe.models.corpus import load_corpus

    corpus = load_corpus()
    docs = {"train": corpus.train, "heldout": corpus.heldout}[split]
    lines = [" ".join(d.split())[:chars] for d in docs]
    lines = [line for line in lines if len(line) >= 16]
    random.Random(seed).shuffle(lines)
    return lines[:count]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=["train", "heldout"], required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--chars", type=int, default=160)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    from edgemoe.converters.atomic import atomic_output

    prompts = corpus_prompts(args.split, args.count, args.chars)
    with atomic_output(args.output) as tmp:  # one prompt per line, as edgemoe.commands.common.read_prompts reads
        tmp.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {len(prompts)} prompts from the {args.split} split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
