"""`edgemoe compress`: MoE-I² end to end on an HF checkpoint, layer by layer.

Pass 1 (importance) streams the calibration activations through every decoder layer and scores
each expert by the reconstruction loss of removing it; the global pruning ratio is then split
across layers. Pass 2 streams again: per MoE layer the genetic search finds K candidate drop
sets; every T MoE layers the KT-reception field picks the combination with the lowest block
output error (running the block on the pruned stream); then the kept experts of those layers
are decomposed (SVD, ranks from importance) and the layers' weights are released. The result
is handed to export.py as a CompressedModel; every decision goes into the report.
"""
from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from itertools import combinations, product
from pathlib import Path
from typing import Callable

import torch

from edgemoe.converters.atomic import atomic_output
from edgemoe.converters.compress.genetic import GAConfig, LayerFitness, genetic_search
from edgemoe.converters.compress.importance import expert_importance, prune_counts, uniform_counts
from edgemoe.converters.compress.lowrank import Factors, apply_factors, decompose_layer
from edgemoe.converters.compress.moe_view import MoELayer, moe_output
from edgemoe.converters.compress.options import (METHODS, CompressError, CompressOptions, ModelShape,
                                                 check_against_model, check_options, check_report_path)
from edgemoe.converters.compress.stream import Stream, open_stream
from edgemoe.memory import return_large_frees_to_os

# (stage, done, total, label): one progress bar per stage
StageProgress = Callable[[str, int, int, str], None]


@dataclass
class Prepared:
    """Everything validated before work starts."""
    hf_dir: Path
    out: Path
    opts: CompressOptions
    conv: object
    shape: ModelShape
    text: object


@dataclass
class CompressResult:
    path: Path
    report: dict
    seconds: float
    model: object   # the export.CompressedModel written (kept ids, low-rank factors)


def prepare(hf_dir, out_path, opts: CompressOptions, report_path: Path | None = None) -> Prepared:
    """Every check that can be made before any work: settings, checkpoint, output, calibration text."""
    from edgemoe.converters.arch import converter_for
    from edgemoe.converters.atomic import check_output_path
    from edgemoe.converters.calib_text import calibration_text
    from edgemoe.converters.extended import split_plan
    from edgemoe.converters.hf_checkpoint import HFCheckpoint

    check_options(opts)
    out = Path(out_path)
    check_output_path(out)
    check_report_path(report_path, out)
    conv = converter_for(HFCheckpoint(hf_dir))
    _, experts = split_plan(conv.plan())
    n_exp = Counter(layer for layer, _ in experts)
    if not n_exp:
        raise CompressError(f"{hf_dir} has no routed experts to compress")
    top_k = int(conv.ckpt.config.get("num_experts_per_tok") or 0)
    shape = ModelShape(dict(sorted(n_exp.items())), top_k, conv.n_layers)
    check_against_model(opts, shape)
    return Prepared(Path(hf_dir), out, opts, conv, shape, calibration_text(opts.calib))


def compress(p: Prepared, on_progress: StageProgress | None = None, report_path: Path | None = None) -> CompressResult:
    """Search, decompose, (optionally) evaluate and write the compressed model to p.out (and the
    report to report_path). Both appear complete or not at all."""
    from edgemoe.converters.compress.export import CompressedModel, export_compressed

    start = time.perf_counter()
    return_large_frees_to_os()  # layer-sized tensors come and go: keep peak memory bounded (memory.py)
    o = p.opts
    progress = on_progress or (lambda *a: None)
    report: dict = {"checkpoint": str(p.hf_dir), "options": o.as_dict(), "layers": {}, "blocks": []}
    torch_threads = torch.get_num_threads()
    try:
        if o.n_threads:
            torch.set_num_threads(o.n_threads)
        with open_stream(p.conv, p.text, o.calib_tokens, o.window, o.n_threads) as s:
            report["calibration"] = {"source": p.text.source, "tokens": int(s.bounds[-1]),
                                     "windows": len(s.windows)}
            importance = importance_pass(s, progress)
            counts = _counts(o, p.shape, importance)
            drops, factors = search_pass(s, o, importance, counts, report, progress)
    finally:
        torch.set_num_threads(torch_threads)
    kept = {l: [e for e in range(n) if e not in drops.get(l, ())] for l, n in p.shape.n_experts.items()
            if drops.get(l)}
    low_rank = {(l, e, role): f for (l, e), fs in factors.items() for role, f in fs.items()}
    report["summary"] = _summary(p, kept, low_rank)
    overrides = {}
    if o.lora_steps:
        from edgemoe.converters.compress.lora import lora_recover

        overrides, report["lora"] = lora_recover(p.hf_dir, drops, low_rank, p.text.documents, o, progress)
    if o.eval_tokens and o.lora_steps:  # the fine-tuned weights exist only in the torch model
        lr = report["lora"]
        report["quality"] = dict(lr["heldout_after"], tokens=lr["heldout_tokens"], measured_with="transformers",
                                 perplexity_original=lr["heldout_original_perplexity"])
    elif o.eval_tokens:
        from edgemoe.converters.compress.quality import streamed_quality

        report["quality"] = streamed_quality(p.conv, p.shape, drops, low_rank, o, progress)
    model = CompressedModel(kept=kept, low_rank=low_rank, overrides=overrides, report=report)  # (no timings: files repeat)
    search_s = round(time.perf_counter() - start, 2)
    with contextlib.ExitStack() as stack:
        report_tmp = stack.enter_context(atomic_output(Path(report_path))) if report_path else None
        export_compressed(p.hf_dir, p.out, model, dense_type=o.dense_type, expert_type=o.expert_type,
                          progress=lambda done, total, name: progress("export", done, total, name))
        report = dict(report, summary=dict(report["summary"], file_bytes=p.out.stat().st_size),
                      seconds={"search": search_s, "total": round(time.perf_counter() - start, 2)})
        if report_tmp is not None:
            write_report(report, report_tmp, Path(report_path).suffix)
    return CompressResult(p.out, report, time.perf_counter() - start, model)


def write_report(report: dict, path: Path, suffix: str = ".json") -> None:
    """JSON, or YAML for a .yaml/.yml suffix; integer keys (layer, expert ids) become strings in
    JSON and stay integers in YAML."""
    import json

    if suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(_plain(report), sort_keys=False), encoding="utf-8")
    else:
        path.write_text(json.dumps(_plain(report), indent=1), encoding="utf-8")


def _plain(v):
    """Report values as plain Python (tuples to lists, numbers to float/int) for JSON and YAML."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def importance_pass(s: Stream, progress) -> dict[int, torch.Tensor]:
    """Pass 1: I(l, j) for every MoE layer, on the unpruned model's activations."""
    x = s.embed()
    out = {}
    for i in range(s.n_layers):
        x = s.attention(i, x)
        xn = s.ffn_input(i, x)
        moe = s.load_moe(i) if i in s.moe_indices() else None
        if moe is not None:
            out[i] = expert_importance(moe, xn)
        x += s.ffn(i, xn, moe)
        del moe
        progress("importance", i + 1, s.n_layers, f"layer {i}")
    return out


def _counts(o: CompressOptions, shape: ModelShape, importance: dict[int, torch.Tensor]) -> dict[int, int]:
    top_k = {l: shape.top_k for l in shape.n_experts}
    if o.prune == 0:
        return {l: 0 for l in shape.n_experts}
    if METHODS[o.method] == "moei2":
        return prune_counts({l: float(v.sum()) for l, v in importance.items()}, shape.n_experts, top_k, o.prune)
    return uniform_counts(shape.n_experts, top_k, o.prune)


def search_pass(s: Stream, o: CompressOptions, importance, counts, report, progress):
    """Pass 2: per-layer drop candidates, the KT field over blocks of T MoE layers, then SVD."""
    method = METHODS[o.method]
    use_kt = method in ("moei2", "uniform") and o.prune > 0
    moe_ids = s.moe_indices()
    n_kt = max(1, int((s.bounds <= o.kt_tokens).sum()) - 1)  # whole windows within kt_tokens
    kt_rows = int(s.bounds[n_kt])
    x_ref = s.embed()
    x_prn = x_ref[:kt_rows].clone()   # the pruned stream (earlier blocks' choices applied), KT tokens only
    span_start = 0                    # first decoder layer not yet run on x_prn
    pending: list[tuple[int, MoELayer, torch.Tensor, list[tuple[int, ...]]]] = []
    drops: dict[int, tuple[int, ...]] = {}
    factors: dict[tuple[int, int], dict[str, Factors]] = {}
    n_svd = sum(n - counts[l] for l, n in Counter(l for l, _ in s.experts).items()) if o.rank_ratio < 1 else 0
    svd_done = [0]
    for i in range(s.n_layers):
        x_ref = s.attention(i, x_ref)
        xn = s.ffn_input(i, x_ref)
        moe = None  # release a finished layer before loading the next
        moe = s.load_moe(i) if i in moe_ids else None
        if moe is not None:
            cands = _candidates(method, moe, xn, counts[i], o)
            report["layers"][i] = _layer_record(moe, importance[i], counts[i], cands)
            pending.append((i, moe, xn, [d for d, _ in cands]))
            progress("search", moe_ids.index(i) + 1, len(moe_ids), f"layer {i}")
        x_ref += s.ffn(i, xn, moe)
        last_moe = i == moe_ids[-1]
        if moe is None or not (len(pending) == o.block_t or last_moe):
            continue
        if use_kt:
            choice, x_prn, block = kt_block(s, x_prn, x_ref[:kt_rows], span_start, i, pending, progress)
            report["blocks"].append(block)
        else:
            choice = {l: c[0] for l, _, _, c in pending}
        span_start = i + 1
        for l, m, xl, _ in pending:
            drops[l] = choice[l]
            _finish_layer(m, xl, importance[l], choice[l], o, factors, report["layers"][l], progress, svd_done, n_svd)
        pending, m = [], None
        if last_moe:
            break
    return drops, factors


def _candidates(method: str, moe: MoELayer, xn: torch.Tensor, n_drop: int, o: CompressOptions):
    """[(drop set, layer output error)], best first: K for the searches, one for the baselines."""
    if n_drop == 0:
        return [((), 0.0)]
    fit = LayerFitness(moe, xn)
    if method in ("moei2", "uniform"):
        ga = GAConfig(population=o.population, generations=o.generations, elite=o.elite, mutation=o.mutation,
                      keep_best=o.keep_k, seed=o.seed + moe.index, crossover=o.crossover)
        return genetic_search(fit, n_drop, ga)
    if method == "naee":
        best = min(combinations(range(moe.n_experts), n_drop), key=fit)
    elif method == "frequency":
        ids = torch.topk(xn @ moe.router.weight.T, moe.top_k, dim=-1).indices
        freq = Counter(ids.flatten().tolist())
        best = tuple(sorted(sorted(range(moe.n_experts), key=lambda e: (freq[e], e))[:n_drop]))
    else:  # random
        best = tuple(sorted(random.Random(o.seed + moe.index).sample(range(moe.n_experts), n_drop)))
    return [(best, fit(best))]


def kt_block(s: Stream, x_prn, ref_end, span_start: int, end: int, pending, progress):
    """Try all K^T combinations of the pending layers' candidates on the pruned stream from
    decoder layer span_start to `end`; keep the one closest to the unpruned stream at `end`."""
    loaded = {l: m for l, m, _, _ in pending}
    combos = list(product(*(c for _, _, _, c in pending)))
    best, best_err, best_x = None, float("inf"), None
    for n, combo in enumerate(combos, 1):
        drop = {l: d for (l, _, _, _), d in zip(pending, combo)}
        x = x_prn
        for i in range(span_start, end + 1):
            x = s.attention(i, x)
            x = x + s.ffn(i, s.ffn_input(i, x), loaded.get(i), drop.get(i, ()))
        err = (x - ref_end).norm().item()
        if err < best_err:
            best, best_err, best_x = drop, err, x
        progress("kt field", n, len(combos), f"layers {span_start}-{end}")
    record = {"layers": [l for l, *_ in pending], "combinations": len(combos), "block_error": best_err,
              "relative_block_error": best_err / max(ref_end.norm().item(), 1e-30),
              "chosen": {l: list(d) for l, d in best.items()}}
    return best, best_x, record


def _layer_record(moe: MoELayer, importance: torch.Tensor, n_drop: int, cands) -> dict:
    return {"experts": moe.n_experts, "drop_count": n_drop, "importance": [float(v) for v in importance],
            "layer_importance": float(importance.sum()),
            "candidates": [{"dropped": list(d), "error": float(e)} for d, e in cands]}


def _finish_layer(moe: MoELayer, xn, importance, drop, o: CompressOptions, factors, rec: dict, progress,
                  svd_done, n_svd) -> None:
    keep = [e for e in range(moe.n_experts) if e not in drop]
    rec.update(kept=keep, dropped=list(drop), kept_count=len(keep))
    full = moe_output(moe, xn)
    if o.rank_ratio < 1:
        fs = decompose_layer(moe, xn, importance, o.rank_ratio, o.svd == "whitened", keep, o.rank_multiple)
        rec["ranks"], rec["svd_relative_error"] = {}, {}
        for e, roles in fs.items():
            factors[(moe.index, e)] = roles
            w = {"gate": moe.gate_up[e].chunk(2, dim=0)[0], "up": moe.gate_up[e].chunk(2, dim=0)[1],
                 "down": moe.down[e]}
            rec["ranks"][e] = {r: f.rank for r, f in roles.items()}
            rec["svd_relative_error"][e] = {r: float((w[r] - f.weight()).norm() / w[r].norm().clamp(min=1e-30))
                                            for r, f in roles.items()}
            svd_done[0] += 1
            progress("svd", svd_done[0], n_svd, f"layer {moe.index} expert {e}")
        apply_factors(moe, fs)  # the streamed layer is released after this: nothing to restore
    err = (full - moe_output(moe, xn, tuple(drop))).norm() / full.norm().clamp(min=1e-30)
    rec["output_relative_error"] = float(err)


def _summary(p: Prepared, kept: dict[int, list[int]], low_rank: dict) -> dict:
    """Expert parameter counts before and after (values, not bytes: the file's bytes depend on
    the types export picks; the written file's size is added after export)."""
    from edgemoe.converters.extended import split_plan

    _, experts = split_plan(p.conv.plan())
    before = sum(src.n_params for src in experts.values())
    after = 0
    for (l, e), src in experts.items():
        if e not in kept.get(l, [e]):
            continue
        for role, (rows, cols) in src.shapes.items():
            f = low_rank.get((l, e, role))
            after += rows * cols if f is None else f.a.numel() + f.b.numel()
    return {"experts_before": len(experts), "experts_after": sum(len(v) for v in kept.values()) +
            sum(n for l, n in p.shape.n_experts.items() if l not in kept),
            "expert_params_before": before, "expert_params_after": after,
            "expert_param_share": after / max(before, 1)}
