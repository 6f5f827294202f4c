"""Pruning study: MoE-I² against its baselines, and the low-rank stage, on an HF MoE checkpoint
(default: the demo model), each row decided by `edgemoe compress`'s own code (pipeline.decide:
the streamed search, KT field and SVD) and measured by its own held-out check (`--eval`:
perplexity, KL vs the original, top-1 agreement; edgemoe.bench.quality.QualitySums' averaging).
Nothing is written. Prints markdown tables.

    python -m edgemoe.converters.compress.study [--model DIR] [--ratios 0.25,0.5]
    python -m edgemoe.converters.compress.study --lowrank 0.9,0.7,0.5,0.3 [--combined 0.25:0.7]

--lowrank: stage 2 alone at each rank ratio, plain vs whitened SVD, ranks from importance;
expert bytes (factors vs dense experts, both counted at f16) next to quality. --combined P:R
adds rows with MoE-I² pruning at P followed by rank ratio R on the kept experts.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

from edgemoe.converters.compress.options import METHODS, CompressOptions
from edgemoe.converters.compress.pipeline import decide, prepare

F16_BYTES = 2


def main(argv: list[str] | None = None) -> None:
    from edgemoe.models import demo_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: the demo model)")
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--kt-tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--population", type=int, default=24)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--keep-k", type=int, default=3, help="K of the KT-reception field")
    p.add_argument("--block-t", type=int, default=3, help="T of the KT-reception field")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lowrank", default=None, help="rank ratios for the low-rank table (0.9,0.7,0.5,0.3)")
    p.add_argument("--combined", default=None, help="with --lowrank: PRUNE:RANK rows (0.25:0.7)")
    a = p.parse_args(argv)
    folder = a.model or demo_dir()
    base = CompressOptions(calib_tokens=a.calib_tokens, kt_tokens=a.kt_tokens, eval_tokens=a.eval_tokens,
                           window=a.window, population=a.population, generations=a.generations, keep_k=a.keep_k,
                           block_t=a.block_t, n_threads=a.threads)
    if a.lowrank:
        rows = [(0.0, float(r)) for r in a.lowrank.split(",")]
        rows += [tuple(float(v) for v in pr.split(":")) for pr in (a.combined.split(",") if a.combined else [])]
        return lowrank_table(folder, base, rows)
    pruning_table(folder, base, [float(r) for r in a.ratios.split(",")])


def run_row(folder, opts: CompressOptions) -> tuple[dict, float]:
    """The report of one decision (with its held-out quality), and the seconds it took."""
    t0 = time.perf_counter()
    report = decide(prepare(folder, None, opts)).report
    return report, time.perf_counter() - t0


def pruning_table(folder, base: CompressOptions, ratios: list[float]) -> None:
    print("| pruned | method | experts dropped per layer | perplexity (original) | KL vs original | top-1 agreement "
          "| search s |")
    print("|---|---|---|---|---|---|---|")
    for ratio in ratios:
        for method in METHODS:
            report, seconds = run_row(folder, replace(base, prune=ratio, method=method))
            q = report["quality"]
            counts = ", ".join(str(rec["drop_count"]) for _, rec in sorted(report["layers"].items()))
            print(f"| {ratio:.0%} | {method} | {counts} | {q['perplexity']:.1f} ({q['perplexity_original']:.1f}) | "
                  f"{q['kl']:.4f} | {q['top1']:.3f} | {seconds:.0f} |", flush=True)


def lowrank_table(folder, base: CompressOptions, rows: list[tuple[float, float]]) -> None:
    print("| pruned | rank ratio | SVD | expert MiB (f16) | share of dense | perplexity (original) | KL vs original "
          "| top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for prune, ratio in rows:
        for svd in ("plain", "whitened"):
            report, _ = run_row(folder, replace(base, prune=prune, rank_ratio=ratio, svd=svd))
            q, s = report["quality"], report["summary"]
            print(f"| {prune:.0%} | {ratio} | {svd} | {s['expert_params_after'] * F16_BYTES / 2**20:.2f} | "
                  f"{s['expert_param_share']:.0%} | {q['perplexity']:.1f} ({q['perplexity_original']:.1f}) | "
                  f"{q['kl']:.4f} | {q['top1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
