"""The two streamed passes of `edgemoe compress` (MoE-I² stages 1 and 2), one decoder layer at a time.

Pass 1 (`importance_pass`) scores every expert by the reconstruction loss of removing it; the
global pruning ratio is then split across layers (`drop_counts`). Pass 2 (`search_pass`): per MoE
layer, K candidate drop sets ranked by the layer's output error (`layer_candidates`: the genetic
search, or one set from a baseline); every T MoE layers, the KT-reception field (`kt_block`) runs
all K^T combinations through the block's decoder layers on the pruned stream and keeps the one
closest to the unpruned stream; then the kept experts of those layers are decomposed (SVD, ranks
from importance) and the layers' weights are released.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from itertools import product

import torch

from edgemoe.converters.compress.genetic import GAConfig, LayerFitness, exhaustive_search, genetic_search
from edgemoe.converters.compress.importance import expert_importance, prune_counts, uniform_counts
from edgemoe.converters.compress.lowrank import Factors, apply_factors, decompose_layer
from edgemoe.converters.compress.moe_view import MoELayer, moe_output
from edgemoe.converters.compress.options import METHODS, CompressOptions, ModelShape
from edgemoe.converters.compress.stream import Stream

DropSet = tuple[int, ...]   # expert ids removed from one layer, ascending


@dataclass
class PendingLayer:
    """A searched MoE layer waiting for its block's KT field, its experts still in memory."""
    moe: MoELayer
    xn: torch.Tensor                        # its MoE input on the unpruned stream, [N, D]
    candidates: list[tuple[DropSet, float]]  # (drop set, layer output error), best first


def importance_pass(s: Stream, progress) -> dict[int, torch.Tensor]:
    """Pass 1: I(l, j) [E] for every MoE layer l, on the unpruned model's activations."""
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


def drop_counts(o: CompressOptions, shape: ModelShape, importance: dict[int, torch.Tensor]) -> dict[int, int]:
    """Experts to drop per MoE layer: non-uniform by layer importance for MoE-I², the same share
    in every layer for the baselines."""
    top_k = {l: shape.top_k for l in shape.n_experts}
    if o.prune == 0:
        return {l: 0 for l in shape.n_experts}
    if METHODS[o.method] == "moei2":
        return prune_counts({l: float(v.sum()) for l, v in importance.items()}, shape.n_experts, top_k, o.prune)
    return uniform_counts(shape.n_experts, top_k, o.prune)


def layer_candidates(moe: MoELayer, xn: torch.Tensor, n_drop: int, o: CompressOptions) -> list[tuple[DropSet, float]]:
    """[(drop set, Frobenius error of the layer's MoE output on xn [N, D])], best first: the K best
    for the searches (moe-i2, uniform), the one set a baseline picks otherwise."""
    method = METHODS[o.method]
    if n_drop == 0:
        return [((), 0.0)]
    fit = LayerFitness(moe, xn)
    if method in ("moei2", "uniform"):
        ga = GAConfig(population=o.population, generations=o.generations, elite=o.elite, mutation=o.mutation,
                      keep_best=o.keep_k, seed=o.seed + moe.index, crossover=o.crossover)
        return genetic_search(fit, n_drop, ga)
    if method == "naee":
        best = exhaustive_search(fit, n_drop)
    elif method == "frequency":  # the experts the router picks least often on the calibration tokens
        ids = torch.topk(xn @ moe.router.weight.T, moe.top_k, dim=-1).indices
        freq = Counter(ids.flatten().tolist())
        best = tuple(sorted(sorted(range(moe.n_experts), key=lambda e: (freq[e], e))[:n_drop]))
    else:  # random
        best = tuple(sorted(random.Random(o.seed + moe.index).sample(range(moe.n_experts), n_drop)))
    return [(best, fit(best))]


def kt_block(s: Stream, x_prn: torch.Tensor, ref_end: torch.Tensor, start: int, pending: list[PendingLayer],
             progress) -> tuple[dict[int, DropSet], torch.Tensor, dict]:
    """The KT-reception field over one block: x_prn [N, D] is the pruned stream before decoder layer
    `start`, ref_end the unpruned stream after the block's last MoE layer. Every combination of
    the pending layers' candidates runs decoder layers start..end on x_prn; the one whose output is
    closest to ref_end (Frobenius) wins. -> (drop set per layer, the winner's stream, report record)."""
    end = pending[-1].moe.index
    loaded = {p.moe.index: p.moe for p in pending}
    combos = list(product(*([d for d, _ in p.candidates] for p in pending)))
    best, best_err, best_x = None, float("inf"), None
    for n, combo in enumerate(combos, 1):
        drop = dict(zip(loaded, combo))
        x = x_prn
        for i in range(start, end + 1):
            x = s.attention(i, x)
            x = x + s.ffn(i, s.ffn_input(i, x), loaded.get(i), drop.get(i, ()))
        err = (x - ref_end).norm().item()
        if err < best_err:
            best, best_err, best_x = drop, err, x
        progress("kt field", n, len(combos), f"layers {start}-{end}")
    record = {"layers": list(loaded), "combinations": len(combos), "block_error": best_err,
              "relative_block_error": best_err / max(ref_end.norm().item(), 1e-30),
              "chosen": {l: list(d) for l, d in best.items()}}
    return best, best_x, record


def search_pass(s: Stream, o: CompressOptions, importance: dict[int, torch.Tensor], counts: dict[int, int],
                report: dict, progress) -> tuple[dict[int, DropSet], dict[tuple[int, int], dict[str, Factors]]]:
    """Pass 2 -> (drop set per MoE layer, low-rank factors per (layer, expert) and role); fills
    report["layers"] and report["blocks"]."""
    use_kt = METHODS[o.method] in ("moei2", "uniform") and o.prune > 0
    moe_ids = s.moe_indices()
    n_kt = max(1, int((s.bounds <= o.kt_tokens).sum()) - 1)  # whole windows within kt_tokens
    kt_rows = int(s.bounds[n_kt])
    x_ref = s.embed()
    x_prn = x_ref[:kt_rows].clone()   # the pruned stream (earlier blocks' choices applied), KT tokens only
    start = 0                         # first decoder layer not yet run on x_prn
    pending: list[PendingLayer] = []
    drops: dict[int, DropSet] = {}
    factors: dict[tuple[int, int], dict[str, Factors]] = {}
    svd = _SvdProgress(progress, sum(n - counts[l] for l, n in Counter(l for l, _ in s.experts).items())
                       if o.rank_ratio < 1 else 0)
    for i in range(s.n_layers):
        x_ref = s.attention(i, x_ref)
        xn = s.ffn_input(i, x_ref)
        moe = None  # release a finished layer before loading the next
        moe = s.load_moe(i) if i in moe_ids else None
        if moe is not None:
            cands = layer_candidates(moe, xn, counts[i], o)
            report["layers"][i] = _layer_record(moe, importance[i], counts[i], cands)
            pending.append(PendingLayer(moe, xn, cands))
            progress("search", moe_ids.index(i) + 1, len(moe_ids), f"layer {i}")
        x_ref += s.ffn(i, xn, moe)
        if moe is None or not (len(pending) == o.block_t or i == moe_ids[-1]):
            continue
        if use_kt:
            choice, x_prn, block = kt_block(s, x_prn, x_ref[:kt_rows], start, pending, progress)
            report["blocks"].append(block)
        else:
            choice = {p.moe.index: p.candidates[0][0] for p in pending}
        start = i + 1
        for p in pending:
            l = p.moe.index
            drops[l] = choice[l]
            factors |= _finish_layer(p, importance[l], choice[l], o, report["layers"][l], svd)
        pending = []
        if i == moe_ids[-1]:
            break
    return drops, factors


class _SvdProgress:
    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def step(self, layer: int, expert: int) -> None:
        self.done += 1
        self.progress("svd", self.done, self.total, f"layer {layer} expert {expert}")


def _layer_record(moe: MoELayer, importance: torch.Tensor, n_drop: int, cands) -> dict:
    return {"experts": moe.n_experts, "drop_count": n_drop, "importance": [float(v) for v in importance],
            "layer_importance": float(importance.sum()),
            "candidates": [{"dropped": list(d), "error": float(e)} for d, e in cands]}


def _finish_layer(p: PendingLayer, importance: torch.Tensor, drop: DropSet, o: CompressOptions, rec: dict,
                  svd: _SvdProgress) -> dict[tuple[int, int], dict[str, Factors]]:
    """Record the layer's decision, decompose its kept experts (stage 2) -> their factors."""
    moe, xn = p.moe, p.xn
    keep = [e for e in range(moe.n_experts) if e not in drop]
    rec.update(kept=keep, dropped=list(drop), kept_count=len(keep))
    full = moe_output(moe, xn)
    out = {}
    if o.rank_ratio < 1:
        fs = decompose_layer(moe, xn, importance, o.rank_ratio, o.svd == "whitened", keep, o.rank_multiple)
        rec["ranks"], rec["svd_relative_error"] = {}, {}
        for e, roles in fs.items():
            out[(moe.index, e)] = roles
            gate, up = moe.gate_up[e].chunk(2, dim=0)
            w = {"gate": gate, "up": up, "down": moe.down[e]}
            rec["ranks"][e] = {r: f.rank for r, f in roles.items()}
            rec["svd_relative_error"][e] = {r: float((w[r] - f.weight()).norm() / w[r].norm().clamp(min=1e-30))
                                            for r, f in roles.items()}
            svd.step(moe.index, e)
        apply_factors(moe, fs)  # the streamed layer is released after this: nothing to restore
    err = (full - moe_output(moe, xn, tuple(drop))).norm() / full.norm().clamp(min=1e-30)
    rec["output_relative_error"] = float(err)
    return out
