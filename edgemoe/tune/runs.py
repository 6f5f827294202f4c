"""One measured generation run for `edgemoe tune`, in this process or a fresh one.

A fresh process per run (`python -m edgemoe.tune.runs REQUEST_JSON`) gives each run a clean
peak RSS and the same starting state. `facts` measures what the memory formula needs: the
runtime's own RSS before any model is opened, dense bytes and KV-cache bytes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from edgemoe.policies import DEFAULT_POLICY, Key


@dataclass(frozen=True)
class RunRequest:
    model: str
    prompts: tuple[str, ...]
    n_tokens: int
    budget_bytes: int | None
    policy: str = DEFAULT_POLICY
    prefetch: bool = False
    threads: int | None = None
    ctx: int = 512
    record_path: str | None = None  # record the routing trace (with router look-ahead logits) here
    trace_path: str | None = None   # the future accesses, for the belady policy


@dataclass(frozen=True)
class RunResult:
    decode_tokens: int
    decode_s: float
    hits: int
    misses: int
    bytes_read: int
    prefetch_issued: int
    prefetch_hits: int
    peak_rss_bytes: int
    tokens: list[int] = field(default_factory=list)  # every generated token, prompt after prompt

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / max(self.decode_tokens, 1)


@dataclass(frozen=True)
class ModelFacts:
    runtime_bytes: int   # RSS of Python + torch + ggml and of an opened engine's own state (the parsed
                         # GGUF metadata, tokenizer, graphs), less its dense weights: measured
    dense_bytes: int     # non-expert tensors (file pages touched through the memmap)
    kv_bytes: int        # KV cache at the tune's context length
    expert_bytes: dict[Key, int]


def measure(req: RunRequest) -> RunResult:
    """Generate `n_tokens` from each prompt with one engine (its cache carries over from prompt to
    prompt, as in the trace). Counts decode steps only, as `simulate(decode_only=True)`."""
    from edgemoe.engine import Engine, EngineConfig
    from edgemoe.memory import peak_rss_bytes, reset_peak_rss
    from edgemoe.trace import Trace, TraceRecorder

    reset_peak_rss()
    future = tuple(Trace.load(req.trace_path).demand_sequence()) if req.policy == "belady" else None
    engine = Engine(req.model, EngineConfig(budget_bytes=req.budget_bytes, policy=req.policy, prefetch=req.prefetch,
                                            n_threads=req.threads, n_ctx=req.ctx, future=future))
    recorder = TraceRecorder(engine) if req.record_path else None
    n = dict(tokens=0, s=0.0, hits=0, misses=0, bytes=0, pf_issued=0, pf_hits=0)
    tokens: list[int] = []
    try:
        for prompt in req.prompts:
            ids = engine.tokenizer.encode(prompt)
            events = list(engine.stream_generate(ids, req.n_tokens, stop_at_eos=False))
            tokens += [e.token for e in events]
            n["tokens"] += len(events) - 1
            n["s"] += events[-1].elapsed_s - events[0].elapsed_s
            for e in events if len(ids) == 1 else events[1:]:  # a one-token prefill is a decode step
                c = e.cache
                for k, v in (("hits", c.hits), ("misses", c.misses), ("bytes", c.bytes_read),
                             ("pf_issued", c.prefetch_issued), ("pf_hits", c.prefetch_hits)):
                    n[k] += v
        if recorder is not None:
            recorder.detach().save(req.record_path)
    finally:
        engine.close()
    return RunResult(n["tokens"], n["s"], n["hits"], n["misses"], n["bytes"], n["pf_issued"], n["pf_hits"],
                     peak_rss_bytes(), tokens)


def facts(model: str, ctx: int) -> ModelFacts:
    import torch  # noqa: F401  (the runtime is loaded before the baseline is read)

    from edgemoe.engine import Engine, EngineConfig
    from edgemoe.memory import current_rss_bytes
    from edgemoe.native.backend import CpuBackend

    CpuBackend(1).close()
    before = current_rss_bytes()
    engine = Engine(model, EngineConfig(n_ctx=ctx, preload=False))  # no expert loaded: this measures the rest
    try:
        dense = sum(t.nbytes for t in engine.file.tensors.values() if not t.is_expert)
        # what the open engine holds besides its dense weights (no expert is loaded yet): gguf-py's
        # parse of a 151,936-token vocabulary alone is ~300 MiB, which the RSS before open missed
        # and a 3 GiB cap then took from the mapped dense pages (re-read every token, then OOM)
        runtime = max(before, current_rss_bytes() - dense)
        return ModelFacts(runtime, dense, engine.model.new_kv(ctx).nbytes,
                          {k: s.alloc_bytes for k, s in engine.specs.items()})
    finally:
        engine.close()


class RunFailed(RuntimeError):
    """A measuring subprocess died (its stderr tail is in the message)."""


def in_subprocess(mode: str, payload: dict) -> dict:
    """Run `mode` ("measure" or "facts") in a fresh Python; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, "-m", "edgemoe.tune.runs", json.dumps({"mode": mode, **payload})],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"measuring run ({mode}) failed with exit code {done.returncode}:\n"
                        + "\n".join(done.stderr.strip().splitlines()[-8:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_measure(req: RunRequest, isolated: bool = True) -> RunResult:
    return RunResult(**in_subprocess("measure", asdict(req))) if isolated else measure(req)


def run_facts(model: str, ctx: int, isolated: bool = True) -> ModelFacts:
    if not isolated:
        return facts(model, ctx)
    d = in_subprocess("facts", {"model": model, "ctx": ctx})
    return ModelFacts(d["runtime_bytes"], d["dense_bytes"], d["kv_bytes"],
                      {(l, e): b for l, e, b in d["expert_bytes"]})


def _main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    mode = request.pop("mode")
    if mode == "facts":
        f = facts(request["model"], request["ctx"])
        out = {**asdict(f), "expert_bytes": [[l, e, b] for (l, e), b in sorted(f.expert_bytes.items())]}
    else:
        request["prompts"] = tuple(request["prompts"])
        out = asdict(measure(RunRequest(**request)))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
