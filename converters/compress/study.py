"""Pruning study on a transformers MoE checkpoint (default: the demo model): MoE-I² against
its baselines at given ratios, quality on held-out windows. Prints a markdown table.

    python -m edgemoe.converters.compress.study [--model DIR] [--ratios 0.25,0.5]
    python -m edgemoe.converters.compress.study --lowrank 0.9,0.7,0.5,0.3 [--combined 0.25:0.7]

--lowrank: stage 2 alone at each rank ratio, plain vs whitened SVD, ranks from importance;
expert bytes (f16 factors vs f16 dense) next to quality. --combined P:R adds rows with MoE-I²
pruning at P followed by rank ratio R on the kept experts.
"""
from __future__ import annotations

import argparse
import time

import torch

from edgemoe.converters.compress.calibration import calibration_texts, moe_inputs, token_windows
from edgemoe.converters.compress.evaluate import quality, reference_logprobs
from edgemoe.converters.compress.genetic import GAConfig
from edgemoe.converters.compress.importance import expert_importance
from edgemoe.converters.compress.lowrank import apply_factors, decompose_layer, dense_expert_bytes, factor_bytes, restore
from edgemoe.converters.compress.moe_view import moe_layers
from edgemoe.converters.compress.prune import METHODS, plan_pruning


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgemoe.models import demo_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: the demo model)")
    p.add_argument("--ratios", default="0.25,0.5")
    p.add_argument("--calib-windows", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--population", type=int, default=24)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--block", type=int, default=3, help="T of the KT-reception field")
    p.add_argument("--lowrank", default=None, help="rank ratios for the low-rank table (0.9,0.7,0.5,0.3)")
    p.add_argument("--combined", default=None, help="with --lowrank: PRUNE:RANK rows (0.25:0.7)")
    a = p.parse_args()
    torch.manual_seed(0)
    folder = a.model or demo_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    layers = moe_layers(model)
    calib = token_windows(tok, calibration_texts(None, "train"), a.calib_windows, a.window)
    held = token_windows(tok, calibration_texts(None, "heldout"), a.eval_windows, a.window)
    inputs = moe_inputs(model, layers, calib)
    ref = reference_logprobs(model, held)
    base = quality(model, held, ref)
    ga = GAConfig(population=a.population, generations=a.generations, elite=max(1, a.population // 6))
    print(f"original: perplexity {base.perplexity:.1f} on {held.numel()} held-out tokens\n")
    if a.lowrank:
        return lowrank_table(model, layers, inputs, calib, held, ref, ga, a)
    print("| pruned | method | experts dropped per layer | perplexity | KL vs original | top-1 agreement | search s |")
    print("|---|---|---|---|---|---|---|")
    for ratio in (float(r) for r in a.ratios.split(",")):
        for method in METHODS:
            t0 = time.perf_counter()
            plan = plan_pruning(method, model, layers, inputs, calib[: max(1, a.calib_windows // 2)], ratio, ga, a.block)
            q = quality(model, held, ref, layers, plan.drops)
            counts = ", ".join(str(plan.counts[l.index]) for l in layers)
            print(f"| {ratio:.0%} | {method} | {counts} | {q.perplexity:.1f} | {q.kl:.4f} | {q.top1:.3f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


def lowrank_table(model, layers, inputs, calib, held, ref, ga, a) -> None:
    importance = {l.index: expert_importance(l, inputs[l.index]) for l in layers}
    dense_bytes = sum(dense_expert_bytes(l, l.n_experts) for l in layers)
    rows = [(0.0, float(r)) for r in a.lowrank.split(",")]
    rows += [tuple(float(v) for v in pr.split(":")) for pr in (a.combined.split(",") if a.combined else [])]
    print(f"dense experts (f16): {dense_bytes / 2**20:.2f} MiB\n")
    print("| pruned | rank ratio | SVD | expert MiB (f16) | share of dense | perplexity | KL vs original | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for prune, ratio in rows:
        drops = {}
        if prune:
            drops = plan_pruning("moei2", model, layers, inputs, calib[: max(1, a.calib_windows // 2)], prune, ga,
                                 a.block).drops
        for whitened in (False, True):
            saved, nbytes = {}, 0
            for l in layers:
                keep = [e for e in range(l.n_experts) if e not in drops.get(l.index, ())]
                fs = decompose_layer(l, inputs[l.index], importance[l.index], ratio, whitened, keep)
                nbytes += factor_bytes(fs)
                saved[l.index] = apply_factors(l, fs)
            q = quality(model, held, ref, layers, drops)
            for l in layers:
                restore(l, saved[l.index])
            print(f"| {prune:.0%} | {ratio} | {'whitened' if whitened else 'plain'} | {nbytes / 2**20:.2f} | "
                  f"{nbytes / dense_bytes:.0%} | {q.perplexity:.1f} | {q.kl:.4f} | {q.top1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
