"""One run of one backend configuration, in the process it is started in (the capped benchmark
starts each in a fresh child inside its own memory cgroup): open the model, prefill the prompt,
decode `n_tokens` greedily, and measure.

    python -m edgemoe.bench.capped_run '{"label": ..., "backend": "llama", ...}'

prints one JSON line (a `RunMeasure`) last on stdout. Bytes read from the device come from
/proc/self/io (`read_bytes`: what this process made the block layer fetch, page faults on
llama.cpp's mapping included), the same count for every backend; the expert loader's own bytes
and busy time come from its stats where the backend has one.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgemoe.policies import DEFAULT_POLICY
from edgemoe.predictor.base import DEFAULT_PREDICTOR

BACKENDS = ("llama", "edgemoe", "llama-budget")


@dataclass(frozen=True)
class RunSpec:
    label: str
    backend: str                  # "llama" (plain llama.cpp), "edgemoe" (the engine), "llama-budget" (llama.cpp
                                  # computes, edgemoe's cache decides residency: edgemoe/llama_budget.py)
    model: str
    prompt: str
    n_tokens: int
    n_threads: int
    n_ctx: int
    repack: bool = True           # llama: llama.cpp's CPU repack buffers (model param use_extra_bufts)
    lazy: bool = False            # llama: model param lazy_mode = LLAMA_LAZY_MODE_ON (on-demand row reads)
    warm: bool = False            # the file is read into the page cache first (the compute reference run)
    budget_bytes: int | None = None  # managed backends: expert budget (None: the largest under cap_bytes)
    cap_bytes: int | None = None     # the cgroup's cap, which picks the budget as `generate --max-memory` does
    policy: str = DEFAULT_POLICY
    prefetch: bool = False
    predictor: str = DEFAULT_PREDICTOR   # with prefetch: none | router | prior | cooccur | learned
    predictor_path: str | None = None    # the learned predictor's .onnx


@dataclass(frozen=True)
class RunMeasure:
    prompt_tokens: int
    decode_tokens: int            # forward passes of one token after the prefill
    start_resident_bytes: int     # of the model file in the page cache when the run starts (mincore)
    open_s: float
    prefill_s: float
    decode_s: float
    open_read_bytes: int          # device bytes read while opening (a repacking load reads everything)
    prefill_read_bytes: int
    decode_read_bytes: int
    budget_bytes: int | None = None  # the expert budget the run used (managed backends)
    loader_bytes: int = 0         # expert loader, decode only (managed backends)
    loader_busy_s: float = 0.0    # wall time with a loader read in flight, decode only
    hits: int = 0
    misses: int = 0
    stall_s: float = 0.0
    compute_ms: dict[str, float] = field(default_factory=dict)  # engine: ggml compute per decode token by label
    peak_rss_bytes: int = 0
    tokens: list[int] = field(default_factory=list)
    # CPU time the hypervisor gave to others during the decode (all CPUs, /proc/stat "steal"):
    # on a shared VM host it moves decode speed by more than most changes do
    steal_s: float = 0.0


def device_read_bytes() -> int:
    """Bytes this process (all its threads) made the block layer read: /proc/self/io read_bytes."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes line")


def steal_seconds() -> float:
    """Seconds of CPU time stolen by the hypervisor so far, summed over CPUs (0 where not reported)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    # "cpu user nice system idle iowait irq softirq steal ...", in clock ticks
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 and fields[0] == "cpu" else 0.0


def warm_file(path: str, chunk_bytes: int = 64 * 2**20) -> None:
    """Read the whole file once so its pages sit in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk_bytes)
        while f.readinto(buf):
            pass


def run(spec: RunSpec) -> RunMeasure:
    if spec.backend not in BACKENDS:
        raise ValueError(f"unknown backend {spec.backend!r}; one of {', '.join(BACKENDS)}")
    from edgemoe.bench.pagecache import resident_bytes

    if spec.warm:
        warm_file(spec.model)
    start_resident = resident_bytes(spec.model)
    if spec.backend != "llama" and spec.budget_bytes is None:
        spec = replace(spec, budget_bytes=_budget_under_cap(spec))
    io0, t0 = device_read_bytes(), time.perf_counter()
    opened = _open(spec)
    open_s, io_open = time.perf_counter() - t0, device_read_bytes()
    try:
        return _measure(spec, opened, start_resident, open_s, io_open - io0)
    finally:
        opened.close()


def _budget_under_cap(spec: RunSpec) -> int:
    """What `generate --max-memory CAP` picks in this process: the largest budget whose memory plan
    (edgemoe/memory_cap.py) fits the cap."""
    from edgemoe.errors import InputError
    from edgemoe.memory_cap import budget_for_cap

    if spec.cap_bytes is None:
        raise InputError(f"{spec.label}: give a budget or a cap")
    budget, _ = budget_for_cap(spec.model, spec.cap_bytes, "edgemoe" if spec.backend == "edgemoe" else "llama",
                               spec.n_ctx)
    return budget


def _open(spec: RunSpec):
    if spec.backend == "llama":
        from edgemoe.llama_backend import open_llama

        from llama_cpp import llama_cpp as low

        lazy = low.LLAMA_LAZY_MODE_ON if spec.lazy else low.LLAMA_LAZY_MODE_OFF
        return open_llama(Path(spec.model), n_ctx=spec.n_ctx, n_threads=spec.n_threads,
                          model_params=dict(use_extra_bufts=spec.repack, lazy_mode=lazy))
    if spec.backend == "llama-budget":
        from edgemoe.llama_budget import BudgetedConfig, BudgetedLlama

        return BudgetedLlama(spec.model, BudgetedConfig(budget_bytes=spec.budget_bytes, policy=spec.policy,
                                                        prefetch=spec.prefetch, predictor=spec.predictor,
                                                        predictor_path=spec.predictor_path, n_ctx=spec.n_ctx,
                                                        n_threads=spec.n_threads))
    from edgemoe.engine import Engine, EngineConfig

    return Engine(spec.model, EngineConfig(budget_bytes=spec.budget_bytes, policy=spec.policy, prefetch=spec.prefetch,
                                           predictor=spec.predictor, predictor_path=spec.predictor_path,
                                           n_threads=spec.n_threads, n_ctx=spec.n_ctx))


def _measure(spec: RunSpec, opened, start_resident: int, open_s: float, open_read: int) -> RunMeasure:
    """Consume the backend's StepEvent stream: event 0 ends the prefill, the rest are decode steps."""
    if spec.backend == "llama":
        from edgemoe.llama_backend import stream_generate

        stream, loader, compute = stream_generate(opened, spec.prompt, spec.n_tokens + 1), None, None
    elif spec.backend == "llama-budget":
        stream, loader, compute = opened.stream_generate(spec.prompt, spec.n_tokens + 1), opened.cache.loader, None
    else:
        stream = opened.stream_generate(spec.prompt, spec.n_tokens + 1, stop_at_eos=False)
        loader, compute = getattr(opened.cache, "loader", None), opened.backend.compute_s
    io_start = device_read_bytes()
    events, marks = [], {}
    for event in stream:
        io_end = device_read_bytes()  # at the event: llama.cpp's generator runs one pass past the last
        if not events:  # the prefill is done: decode counts from here
            marks = dict(io=io_end, loader=loader.stats() if loader else None, steal=steal_seconds(),
                         compute=dict(compute) if compute is not None else {})
        events.append(event)
    steal = steal_seconds() - marks.get("steal", 0.0)
    decode = events[1:]
    n = max(len(decode), 1)
    measure = dict(prompt_tokens=_prompt_tokens(spec, opened), decode_tokens=len(decode),
                   start_resident_bytes=start_resident, budget_bytes=spec.budget_bytes, open_s=open_s,
                   prefill_s=events[0].elapsed_s, decode_s=events[-1].elapsed_s - events[0].elapsed_s,
                   open_read_bytes=open_read, prefill_read_bytes=marks["io"] - io_start,
                   decode_read_bytes=io_end - marks["io"], peak_rss_bytes=events[-1].peak_rss_bytes,
                   tokens=[e.token for e in events], steal_s=steal if len(events) > 1 else 0.0)
    if spec.backend != "llama":
        measure.update(hits=sum(e.cache.hits for e in decode), misses=sum(e.cache.misses for e in decode),
                       stall_s=sum(e.cache.stall_s for e in decode),
                       compute_ms={k: 1e3 * (v - marks["compute"].get(k, 0.0)) / n for k, v in (compute or {}).items()})
        if loader is not None:
            end, start = loader.stats(), marks["loader"]
            measure.update(loader_bytes=end.bytes_read - start.bytes_read, loader_busy_s=end.busy_s - start.busy_s)
        else:  # an engine without the shared loader: its CacheStats bytes, demand reads timed by the stall
            measure.update(loader_bytes=sum(e.cache.bytes_read for e in decode), loader_busy_s=measure["stall_s"])
    return RunMeasure(**measure)


def _prompt_tokens(spec: RunSpec, opened) -> int:
    if spec.backend != "edgemoe":
        llm = opened if spec.backend == "llama" else opened.llm
        return len(llm.tokenize(spec.prompt.encode("utf-8"), add_bos=True, special=False))
    return len(opened.tokenizer.encode(spec.prompt))


def main(argv: list[str]) -> int:
    spec = RunSpec(**json.loads(argv[0]))
    print(json.dumps(asdict(run(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
