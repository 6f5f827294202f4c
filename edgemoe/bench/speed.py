"""`edgemoe bench`: edgemoe vs llama.cpp on the same GGUF, measured side by side in one run.

For each model: llama.cpp's prefill and decode tokens/s, the budgeted llama.cpp mode (llama.cpp
computing, edgemoe's cache holding every expert; in llama.cpp's default layout, as it runs at
that budget, and in the slots layout smaller budgets use), then the edgemoe engine at full
expert budget and at smaller shares of the expert bytes, with hit rates next to Belady's
(replayed on the routing recorded at full budget: same prompt, same tokens) and where each
millisecond of a decode token goes. An extended-layout file (mixed precision, compressed) runs in
the engine only: its llama.cpp row says it was skipped and why, and it has no ratio.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edgemoe.bench.engine_only import llama_skip_reason
from edgemoe.engine import Engine, EngineConfig
from edgemoe.llama_backend import open_llama, stream_generate
from edgemoe.memory import peak_rss_bytes, reset_peak_rss
from edgemoe.simulate import simulate
from edgemoe.trace import TraceRecorder


@dataclass(frozen=True)
class BenchRow:
    model: str
    backend: str
    budget_share: float           # of all expert bytes (1.0 for llama.cpp)
    prefill_tps: float
    decode_tps: float
    ratio_vs_llama: float | None   # decode tokens/s / llama.cpp's; None where llama.cpp cannot run the file
    hit_rate: float | None = None
    belady_hit_rate: float | None = None
    mib_read_per_token: float | None = None
    # dense / experts (layer by layer) / token (one-graph decode steps, edgemoe/token_graph.py) / stall /
    # other (Python and glue: the rest of the wall time), other_per_layer
    ms_per_token: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0         # VmHWM over the run, reset before it
    skipped: str = ""                 # why this run did not happen (its numbers are then 0)


def bench_llama(path: Path, prompt_ids: list[int], n_tokens: int, n_threads: int) -> tuple[float, float]:
    llm = open_llama(path, n_ctx=len(prompt_ids) + n_tokens + 8, n_threads=n_threads)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    prefill = len(prompt_ids) / (time.perf_counter() - t0)
    text = llm.detokenize(prompt_ids).decode("utf-8", errors="replace")
    events = list(stream_generate(llm, text, n_tokens))
    llm.close()  # unmaps the model: the engine runs after it in this process
    return prefill, events[-1].tokens_per_s


def bench_llama_budget(path: Path, prompt_ids: list[int], n_tokens: int, n_threads: int, policy: str,
                       full_layout: bool | None = None) -> dict:
    """llama.cpp computing, edgemoe's cache holding every expert (the budgeted mode at full budget):
    every expert is placed untimed first, as llama.cpp reads its weights when it loads, then timed
    as bench_llama times plain llama.cpp. What it costs over plain llama.cpp is the eval callback
    and the cache's bookkeeping per layer, and in the slots layout (`full_layout=False`) also no
    CPU repack. `layout`: which one ran (BudgetedLlama.layout)."""
    from edgemoe.llama_budget import BudgetedConfig, BudgetedLlama, budget_range

    full = budget_range(path)[1]
    rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=full, policy=policy, n_ctx=len(prompt_ids) + n_tokens + 8,
                                            n_threads=n_threads, full_layout=full_layout))
    try:
        for key in rt.specs:
            rt.cache.prefetch(key)
        rt.cache.step_stats()
        rt.llm.reset()
        t0 = time.perf_counter()
        rt.llm.eval(prompt_ids)
        rt.end_step()
        prefill = len(prompt_ids) / (time.perf_counter() - t0)
        text = rt.llm.detokenize(prompt_ids).decode("utf-8", errors="replace")
        events = list(rt.stream_generate(text, n_tokens))
        decode = events[1:]
        hits, misses = sum(e.cache.hits for e in decode), sum(e.cache.misses for e in decode)
        return dict(prefill=prefill, decode=events[-1].tokens_per_s, hit_rate=hits / max(hits + misses, 1),
                    layout=rt.layout)
    finally:
        rt.close()


def bench_engine(path: Path, prompt_ids: list[int], n_tokens: int, config: EngineConfig, record: bool = False):
    reset_peak_rss()  # peak RSS per run, not the process's (llama.cpp ran in it first)
    engine = Engine(path, config)
    try:
        with torch.no_grad():
            # prefill timed warm: the experts the prompt routes to are loaded by a first pass, as
            # llama.cpp reads its weights when it loads the model (untimed)
            for timed in (False, True):
                kv = engine.model.new_kv(len(prompt_ids) + 1)
                t0 = time.perf_counter()
                engine.model.forward(prompt_ids, kv, 0)
                prefill = len(prompt_ids) / (time.perf_counter() - t0)
                kv.close()
        engine.cache.step_stats()
        # routing only (the replay's Belady row): router logits need every layer's input, which a
        # one-graph decode step (edgemoe/token_graph.py) does not stop for
        recorder = TraceRecorder(engine, router_logits=False) if record else None
        events, compute0 = [], {}
        for event in engine.stream_generate(prompt_ids, n_tokens, stop_at_eos=False):
            if not events:  # event 0 is the prefill: count compute from here on
                compute0 = dict(engine.backend.compute_s)
            events.append(event)
        trace = recorder.detach() if recorder else None
        decode = events[1:]  # event 0 carries the prefill
        n = max(len(decode), 1)
        hits, misses = sum(e.cache.hits for e in decode), sum(e.cache.misses for e in decode)
        wall = decode[-1].elapsed_s - events[0].elapsed_s if decode else 0.0
        spent = {k: (v - compute0.get(k, 0.0)) for k, v in engine.backend.compute_s.items()}
        ms = {"dense": spent.get("dense", 0.0), "experts": spent.get("experts", 0.0),
              "token": spent.get("token", 0.0), "stall": sum(e.cache.stall_s for e in decode)}
        ms = {k: 1e3 * v / n for k, v in ms.items()}
        ms["other"] = max(1e3 * wall / n - sum(ms.values()), 0.0)
        ms["other_per_layer"] = ms["other"] / len(engine.model.blocks)
        return dict(prefill=prefill, decode=events[-1].tokens_per_s, hit_rate=hits / max(hits + misses, 1),
                    mib_per_token=sum(e.cache.bytes_read for e in decode) / n / 2**20, ms=ms,
                    peak=peak_rss_bytes() / 2**20, trace=trace, total=engine.expert_bytes_total,
                    tokens=[e.token for e in events])
    finally:
        engine.close()


def run_bench(path: Path, prompt: str, n_tokens: int, shares: list[float], n_threads: int, policy: str = "lru",
              prefetch: bool = False, kv_type: str = "f16", on_row=None, budgeted: bool = True) -> list[BenchRow]:
    """budgeted: also the budgeted llama.cpp mode at full budget beside plain llama.cpp (#13's "full
    budget >= 0.95x"), once in the layout it picks at that budget (`llama.cpp+cache/POLICY/default`)
    and once in the slots layout that smaller budgets run (`llama.cpp+cache/POLICY/slots`)."""
    from edgemoe.tokenizer import Tokenizer

    prompt_ids = Tokenizer(path).encode(prompt)
    name = path.name
    skipped = llama_skip_reason(path)
    if skipped:
        llama_decode, rows = None, [BenchRow(name, "llama.cpp", 1.0, 0.0, 0.0, None, skipped=f"skipped: {skipped}")]
    else:
        llama_prefill, llama_decode = bench_llama(path, prompt_ids, n_tokens, n_threads)
        rows = [BenchRow(name, "llama.cpp", 1.0, llama_prefill, llama_decode, 1.0)]
        for full_layout in (None, False) if budgeted else ():
            b = bench_llama_budget(path, prompt_ids, n_tokens, n_threads, policy, full_layout)
            rows.append(BenchRow(name, f"llama.cpp+cache/{policy}/{b['layout']}", 1.0, b["prefill"], b["decode"],
                                 b["decode"] / llama_decode, b["hit_rate"]))
    for row in rows:
        on_row and on_row(row)
    full = bench_engine(path, prompt_ids, n_tokens, EngineConfig(n_threads=n_threads, n_ctx=len(prompt_ids) + n_tokens + 1,
                                                                 policy=policy, prefetch=prefetch, kv_type=kv_type),
                        record=True)
    trace = full["trace"]
    for share in shares:
        r = full if share >= 1.0 else bench_engine(
            path, prompt_ids, n_tokens, EngineConfig(budget_bytes=int(full["total"] * share), policy=policy,
                                                     prefetch=prefetch, n_threads=n_threads, kv_type=kv_type,
                                                     n_ctx=len(prompt_ids) + n_tokens + 1))
        budget = int(full["total"] * share)
        belady = simulate(trace, budget, "belady").hit_rate if share < 1.0 else 1.0
        rows.append(BenchRow(name, f"edgemoe/{policy}{'+prefetch' if prefetch else ''}", share, r["prefill"],
                             r["decode"], r["decode"] / llama_decode if llama_decode else None, r["hit_rate"], belady,
                             r["mib_per_token"], r["ms"], r["peak"]))
        on_row and on_row(rows[-1])
    return rows


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
