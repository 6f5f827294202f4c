"""Mixed precision vs uniform quantisation at equal expert bytes on the demo model, and dual
precision at small budgets (the tables in docs/BENCHMARKS.md).

    python -m edgemoe.bench.mixed [--windows N] [--dual] [--slice] [--threads 1] [--only TEXT]

Quality: the demo checkpoint calibrated on 8192 tokens of the train split (imatrix "never", the
default, and once more with "auto"), then every variant written in the extended layout with
dense tensors in q8_0: uniform q2_k / q3_k / q4_k (imatrix never / always / auto) and mixed at
each uniform file's expert bytes (imatrix never / auto) and in between (never), and at q3_k's bytes
one type per layer (`--mixed-per layer`, all candidates and only the repacked ones); each evaluated
against the f32 conversion on the held-out split (edgemoe.bench.quality). Dual precision: the demo
q8_0 file (and with --slice the Mixtral-shaped slice) at 50% / 25% budgets, teacher-forced
decoding of held-out text, without low copies and in each dual mode.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from edgemoe.converters.calibration import calibrate
from edgemoe.converters.mixed import REPACKED, convert_mixed, experts_bytes, parse_candidate_types
from edgemoe.demo import demo_gguf
from edgemoe.models import demo_dir
from edgemoe.models.cache import cache_dir
from edgemoe.bench.quality import evaluate

UNIFORM = ("q2_k", "q3_k", "q4_k")
BETWEEN_BITS = (3.0, 4.0)  # mixed budgets between the uniform types' bits per weight
DENSE_TYPE = "q8_0"


def quality_rows(out_dir: Path, max_windows: int | None, n_threads: int, only: str | None = None) -> list[dict]:
    """only: the variants whose name contains it (and the reference), else every one."""
    from edgemoe.converters.arch import converter_for
    from edgemoe.converters.extended import split_plan
    from edgemoe.converters.hf_checkpoint import HFCheckpoint
    from edgemoe.converters.types import parse_output_type
    from edgemoe.engine import EngineConfig

    src = demo_dir()
    t0 = time.perf_counter()
    calib = calibrate(src, n_tokens=8192, n_threads=n_threads)
    print(f"calibrated on {calib.n_tokens} tokens in {time.perf_counter() - t0:.0f}s", flush=True)
    _, experts = split_plan(converter_for(HFCheckpoint(src)).plan())
    n_params = sum(s.n_params for s in experts.values())
    variants: dict[str, dict] = {"experts f32 (dense q8_0 only)": dict(uniform_type="f32")}
    # errors measured with and without importance matrices, the lower kept per expert and type
    both = calibrate(src, n_tokens=8192, n_threads=n_threads, imatrix="auto")
    wins = {t: sum(st.with_imatrix[t] for st in both.experts.values() if st.tokens) for t in both.types}
    print("experts whose measured error was lower with the imatrix, by type: "
          + ", ".join(f"{t.name.lower()} {n}/{len(both.experts)}" for t, n in wins.items()), flush=True)
    for t in UNIFORM:
        t_bytes = experts_bytes(experts, parse_output_type(t)[0])
        variants[f"uniform {t}, imatrix never"] = dict(uniform_type=t, imatrix="never")
        variants[f"uniform {t}, imatrix always"] = dict(uniform_type=t, imatrix="always")
        variants[f"uniform {t}, imatrix auto"] = dict(uniform_type=t, calibration=both, imatrix="auto")
        variants[f"mixed @ {t} bytes (default: imatrix never)"] = dict(expert_bytes=t_bytes)
        variants[f"mixed @ {t} bytes, imatrix auto"] = dict(expert_bytes=t_bytes, calibration=both,
                                                            imatrix="auto")
        if t == "q3_k":  # one type per layer: the engine's one-graph decode (converters/mixed.py)
            variants["mixed @ q3_k bytes, one type per layer"] = dict(expert_bytes=t_bytes, per="layer")
            variants["mixed @ q3_k bytes, one repacked type per layer"] = dict(
                expert_bytes=t_bytes, per="layer", types=parse_candidate_types(REPACKED))
    for bits in BETWEEN_BITS:
        variants[f"mixed @ {bits} bits"] = dict(avg_bits=bits)
    if only:
        variants = {name: kw for name, kw in variants.items() if only in name or name.startswith("experts f32")}
    paths, reports = {}, {}
    for name, kw in variants.items():
        path = out_dir / ("".join(c if c.isalnum() or c in "._" else "_" for c in name) + ".gguf")
        reports[name] = convert_mixed(src, path, dense_type=DENSE_TYPE, **{"calibration": calib, **kw})
        paths[name] = path
    quality = evaluate(list(paths.values()), demo_gguf("f32"), max_windows=max_windows,
                       engine_config=EngineConfig(n_threads=n_threads))
    rows = []
    for (name, rep), q in zip(reports.items(), quality):
        counts = rep.type_counts()
        alloc = rep.allocation
        rows.append(dict(variant=name, expert_mib=q.expert_bytes / 2**20, bits=8 * q.expert_bytes / n_params,
                         types=" ".join(f"{t}×{n}" for t, n in sorted(counts.items())),
                         kl=q.kl, ppl=q.perplexity, top1=q.top1, ref_ppl=q.reference_perplexity, tokens=q.n_tokens,
                         gap="" if alloc is None else f"{alloc.method}, gap {alloc.gap:.2g}"))
    return rows


# (label, (dual_load_above, background loads)); one engine with low copies serves every dual mode
DUAL_MODES = (("q2_k: every miss low, full copy loads behind", (1.0, True)),
              ("q2_k: miss with gate > 0.5 loads, others low only", (0.5, False)),
              ("q2_k: every miss low, nothing loads", (1.0, False)))


def dual_rows(path: Path, n_threads: int, n_tokens: int = 128, shares=(0.5, 0.25)) -> list[dict]:
    """Teacher-forced decoding of held-out text (one token per forward pass): tokens/s, hits,
    share of token x expert slots served low, KL vs the full budget, without and with q2_k copies."""
    from edgemoe.engine import Engine, EngineConfig
    from edgemoe.bench.quality import heldout_windows, teacher_forced_logits

    full = Engine(path, EngineConfig(n_threads=n_threads))
    tokens = heldout_windows(full.tokenizer, window=n_tokens, max_windows=1)[0]
    ref, _ = teacher_forced_logits(full, tokens)
    total = full.expert_bytes_total
    full.close()
    rows = []
    for share in shares:
        budget = int(total * share)
        plain = Engine(path, EngineConfig(budget_bytes=budget, n_threads=n_threads))
        rows.append(_dual_row(plain, tokens, ref, share, "off"))
        plain.close()
        dual = Engine(path, EngineConfig(budget_bytes=budget, n_threads=n_threads, dual_low_type="q2_k"))
        for label, (load_above, background) in DUAL_MODES:
            cache = dual.cache
            cache.set_budget(cache.state.largest_bytes)  # start each mode from an almost empty cache
            cache.set_budget(budget)
            cache.load_above, cache.background_load = load_above, background
            rows.append(_dual_row(dual, tokens, ref, share, label))
            cache.drain()
        dual.close()
    return rows


def _dual_row(engine, tokens: list[int], ref, share: float, label: str) -> dict:
    from edgemoe.bench.quality import QualitySums, teacher_forced_logits

    t0 = time.perf_counter()
    logits, stats = teacher_forced_logits(engine, tokens)
    seconds = time.perf_counter() - t0
    accesses = sum(s.accesses for s in stats)
    low = engine.cache.low
    return dict(share=share, dual=label, tps=len(tokens) / seconds,
                hit=sum(s.hits for s in stats) / max(accesses, 1),
                low=sum(s.low_token_slots for s in stats) / max(sum(s.token_slots for s in stats), 1),
                stall_ms=1e3 * sum(s.stall_s for s in stats) / len(tokens),
                mib_read=sum(s.bytes_read for s in stats) / len(tokens) / 2**20,
                kl=QualitySums.of_window(tokens, logits, ref).mean_kl, low_mib=engine.low_bytes / 2**20,
                budget_mib=engine.cache.budget_bytes / 2**20, build_s=low.build_s if low else 0.0)


def print_dual(rows: list[dict]) -> None:
    print("\n| budget | dual | tok/s | hit % | token x expert slots served low | stall ms/tok | MiB read/tok | "
          "KL vs full budget | low copies MiB (built in s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        low = f"{r['low_mib']:.2f} ({r['build_s']:.1f} s)" if r["low_mib"] else "0"
        print(f"| {100 * r['share']:.0f}% ({r['budget_mib']:.1f} MiB) | {r['dual']} | {r['tps']:.1f} | "
              f"{100 * r['hit']:.1f} | {100 * r['low']:.1f}% | {r['stall_ms']:.2f} | {r['mib_read']:.2f} | "
              f"{r['kl']:.5f} | {low} |")


def print_quality(rows: list[dict]) -> None:
    print(f"\nreference: demo f32, held-out perplexity {rows[0]['ref_ppl']:.2f} on {rows[0]['tokens']} tokens")
    print("| variant | expert MiB | bits/weight | expert types | KL vs f32 (nats/token) | perplexity | top-1 agree "
          "| allocation |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['expert_mib']:.3f} | {r['bits']:.3f} | {r['types']} | {r['kl']:.5f} | "
              f"{r['ppl']:.3f} | {100 * r['top1']:.2f}% | {r['gap']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=None, help="held-out windows (default: all)")
    p.add_argument("--threads", type=int, default=1, help="ggml threads (torch always uses one)")
    p.add_argument("--dual", action="store_true", help="only the dual-precision tables")
    p.add_argument("--slice", action="store_true", help="also dual precision on the Mixtral-shaped slice")
    p.add_argument("--only", default=None, metavar="TEXT",
                   help="quality: only the variants whose name contains TEXT (the f32-experts floor always runs)")
    a = p.parse_args()
    torch.set_num_threads(1)  # torch's small per-token ops; an oversubscribed pool of 2 runs them ~10x slower
    if not a.dual:
        print_quality(quality_rows(cache_dir("bench", "mixed"), a.windows, a.threads, a.only))
    print_dual(dual_rows(demo_gguf(), a.threads))
    if a.slice:
        from edgemoe.models.mixtral_slice import write_mixtral_slice

        path = cache_dir("bench") / "mixtral-slice-2L-q4_k.gguf"
        if not path.exists():
            write_mixtral_slice(path, 2, "q4_k")
        print_dual(dual_rows(path, a.threads, n_tokens=24, shares=(0.5,)))


if __name__ == "__main__":
    main()
