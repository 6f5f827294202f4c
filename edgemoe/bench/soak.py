"""Soak: generate for a long time at a tight expert budget (misses -> preads, evictions, the
prefetch thread) and watch the process for leaks: resident memory, open file descriptors and
threads, sampled from /proc. The engine is also closed and reopened every few prompts (what a
chat session that switches models does), so a handle or ggml context left behind by `close`
shows up too.

    python -m edgemoe.bench.soak --minutes 30            # the benchmark (docs/RELIABILITY.md)
    python -m edgemoe.bench.soak --minutes 1 --json      # what tests/test_soak.py runs

Growth is measured from the end of the warm-up (allocator pools, torch and ggml first-use
buffers fill during it) to the end of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STEMS = ["def ", "class ", "import ", "The ", "Return ", "If the ", "This module", "    for ", "# ", "raise ",
         "with open(", "A list of", "Note that", "try:\n    ", "async def ", "The default"]


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    tokens: int
    rss_bytes: int
    open_fds: int
    threads: int


@dataclass
class SoakReport:
    model: str
    budget_bytes: int
    expert_bytes: int
    policy: str
    prefetch: bool
    seconds: float = 0.0
    tokens: int = 0
    prompts: int = 0
    reopens: int = 0
    misses: int = 0
    bytes_read: int = 0
    samples: list[Sample] = field(default_factory=list)
    warmup_index: int = 0  # samples[warmup_index] is the baseline

    def growth(self, name: str) -> int:
        """Largest value after the warm-up minus the value at its end."""
        after = [getattr(s, name) for s in self.samples[self.warmup_index:]]
        return max(after) - after[0] if after else 0

    def final_growth(self, name: str) -> int:
        return getattr(self.samples[-1], name) - getattr(self.samples[self.warmup_index], name)

    def summary(self) -> dict:
        base = self.samples[self.warmup_index]
        return dict(model=self.model, minutes=round(self.seconds / 60, 2), tokens=self.tokens, prompts=self.prompts,
                    reopens=self.reopens, tokens_per_s=round(self.tokens / max(self.seconds, 1e-9), 2),
                    misses=self.misses, read_mib=round(self.bytes_read / 2**20, 1),
                    budget_mib=round(self.budget_bytes / 2**20, 2), expert_mib=round(self.expert_bytes / 2**20, 2),
                    policy=self.policy, prefetch=self.prefetch, samples=len(self.samples),
                    baseline_rss_mib=round(base.rss_bytes / 2**20, 1),
                    rss_growth_mib=round(self.growth("rss_bytes") / 2**20, 2),
                    rss_final_growth_mib=round(self.final_growth("rss_bytes") / 2**20, 2),
                    fd_growth=self.growth("open_fds"), thread_growth=self.growth("threads"),
                    baseline_fds=base.open_fds, baseline_threads=base.threads)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def soak(model: str | Path, seconds: float, budget_share: float = 0.25, policy: str = "lru", prefetch: bool = True,
         max_tokens: int = 48, reopen_every: int = 20, sample_every_s: float = 2.0, warmup_share: float = 0.2,
         seed: int = 0, n_threads: int | None = 1, on_sample=None) -> SoakReport:
    from edgemoe.engine import Engine, EngineConfig

    def open_engine() -> Engine:
        return Engine(model, EngineConfig(budget_bytes=budget, policy=policy, prefetch=prefetch, n_ctx=256,
                                          n_threads=n_threads, seed=seed))

    probe = Engine(model, EngineConfig(n_ctx=64, n_threads=n_threads))
    sizes = [s.alloc_bytes for s in probe.specs.values()]
    probe.close()
    budget = max(int(sum(sizes) * budget_share), 2 * max(sizes))
    report = SoakReport(str(model), budget, sum(sizes), policy, prefetch)
    rng = random.Random(seed)
    engine = open_engine()
    start = last_sample = time.monotonic()

    def sample() -> None:
        s = Sample(time.monotonic() - start, report.tokens, rss_bytes(), open_fds(), threads())
        report.samples.append(s)
        if on_sample:
            on_sample(s)

    sample()
    warmed = False
    try:
        while time.monotonic() - start < seconds:
            prompt = rng.choice(STEMS) + rng.choice(STEMS).strip()
            for event in engine.stream_generate(prompt, max_tokens, temperature=0.8, top_p=0.95, stop_at_eos=False):
                report.tokens += 1
                report.misses += event.cache.misses
                report.bytes_read += event.cache.bytes_read
            report.prompts += 1
            if reopen_every and report.prompts % reopen_every == 0:
                engine.close()
                engine = open_engine()
                report.reopens += 1
            now = time.monotonic()
            if now - last_sample >= sample_every_s:
                sample()
                last_sample = now
                if not warmed and now - start >= warmup_share * seconds:
                    report.warmup_index, warmed = len(report.samples) - 1, True
    finally:
        engine.close()
    sample()
    if not warmed:
        report.warmup_index = max(len(report.samples) - 2, 0)
    report.seconds = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgemoe.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help=".gguf file (default: the demo model)")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--budget-share", type=float, default=0.25, help="share of all expert bytes (default 0.25)")
    p.add_argument("--policy", default="lru")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per prompt")
    p.add_argument("--reopen-every", type=int, default=20, help="close and reopen the engine every N prompts (0: never)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup-share", type=float, default=0.2, help="share of the run before the baseline sample")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rss-growth-mib", type=float, default=16.0)
    p.add_argument("--json", action="store_true", help="print the summary and samples as JSON")
    args = p.parse_args(argv)
    if args.model is None:
        from edgemoe.demo import demo_gguf
        args.model = str(demo_gguf())
    import torch
    torch.set_num_threads(args.threads)  # small per-token matmuls: one thread is fastest on shared cores

    def show(s: Sample) -> None:
        if not args.json:
            print(f"{s.elapsed_s:7.0f}s {s.tokens:8d} tokens  RSS {s.rss_bytes / 2**20:7.1f} MiB  "
                  f"fds {s.open_fds:3d}  threads {s.threads:3d}", flush=True)

    report = soak(args.model, args.minutes * 60, args.budget_share, args.policy, not args.no_prefetch,
                  args.max_tokens, args.reopen_every, args.sample_every, args.warmup_share, n_threads=args.threads,
                  on_sample=show)
    summary = report.summary()
    if args.json:
        print(json.dumps(dict(summary=summary, samples=[asdict(s) for s in report.samples])))
    else:
        print(json.dumps(summary, indent=1))
    ok = (summary["rss_growth_mib"] <= args.max_rss_growth_mib and summary["fd_growth"] <= 0
          and summary["thread_growth"] <= 0)
    if not ok:
        print("soak: growth beyond the bounds", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
