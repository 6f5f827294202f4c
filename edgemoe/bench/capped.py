"""`edgemoe bench --max-memory CAP`: every backend configuration under a real memory cap.

Per model: the disk's read bandwidth is probed (4 parallel O_DIRECT streams of 8 MiB blocks
over the file, `edgemoe.tune.machine.read_cold_bps`), the compute cost of a token is measured
once with the whole file in the page cache and no cap (plain llama.cpp, mmap, no repack: the
kernels every capped llama.cpp run uses), and then each configuration runs in a fresh child
process inside its own memory cgroup, the file's page cache dropped (and checked with mincore)
before it starts. A run the kernel's OOM killer ends is reported as killed, not as an error.

The bound of a run: its device bytes read per decode token / probed bandwidth + the compute
per token, i.e. what this machine could decode at if every byte the run had to read arrived at
the disk's parallel bandwidth and nothing else cost time (docs/BENCHMARKS.md). The disk is
probed again after the model's runs and the bound takes the faster probe: this shared host's
disk gave 1.75 GB/s in one probe and 3.1-3.2 GB/s to the loader minutes later, which put runs
at "157% of the bound".

An extended-layout file (mixed precision, compressed) runs in the engine only: its llama.cpp runs
(and the llama.cpp compute reference, so its bound) are reported as skipped, with the reason.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgemoe.bench.capped_run import RunMeasure, RunSpec
from edgemoe.bench.engine_only import llama_skip_reason
from edgemoe.bench.cgroup import CgroupUsage, MemoryCgroup
from edgemoe.bench.pagecache import drop_file_cache
from edgemoe.errors import InputError
from edgemoe.policies import DEFAULT_POLICY
from edgemoe.predictor.base import DEFAULT_PREDICTOR

PROBE_STREAMS, PROBE_BLOCK_BYTES, PROBE_MAX_S = 4, 8 * 2**20, 3.0
# which configurations `--runs` names; plain llama.cpp ones are the baseline the ratio is taken against
PLAIN_LLAMA = {"llama": dict(repack=True, lazy=False, label="llama.cpp defaults (CPU repack)"),
               "llama-norepack": dict(repack=False, lazy=False, label="llama.cpp mmap, no repack"),
               "llama-lazy": dict(repack=False, lazy=True, label="llama.cpp mmap, no repack, lazy")}
MANAGED = {"edgemoe": "edgemoe engine", "llama-budget": "llama.cpp + edgemoe cache"}  # the latter: llama_budget.py
ENGINE_RUNS = ("edgemoe",)  # the runs an extended-layout file has (llama.cpp computes every other one)
RUN_NAMES = (*PLAIN_LLAMA, *MANAGED)


@dataclass(frozen=True)
class CappedOptions:
    cap_bytes: int
    prompt: str
    n_tokens: int = 32
    n_threads: int = 1
    n_ctx: int = 256
    runs: tuple[str, ...] = RUN_NAMES
    budget_bytes: int | None = None    # managed runs; None: each the largest its memory plan fits under the cap
    policy: str = DEFAULT_POLICY
    prefetch: bool = False
    predictor: str = DEFAULT_PREDICTOR  # with prefetch (RunSpec.predictor)
    predictor_path: str | None = None
    reference: bool = True             # measure compute per token on a warm, uncapped run
    cgroup_root: Path | None = None    # where groups are made (default: below this process's own cgroup)
    run_timeout_s: float = 3600.0


@dataclass(frozen=True)
class CappedResult:
    label: str
    name: str                   # the --runs name ("reference" for the compute run)
    status: str                 # "ok", "oom-killed", "failed", "timed out", "skipped"
    detail: str = ""            # stderr tail of a failed run; why a run was skipped
    budget_bytes: int | None = None
    cold_resident_bytes: int = 0  # bytes of the file still in the page cache after the drop
    usage: CgroupUsage | None = None
    measure: RunMeasure | None = None

    @property
    def decode_tps(self) -> float:
        m = self.measure
        return m.decode_tokens / m.decode_s if m and m.decode_s > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        m = self.measure
        return m.prompt_tokens / m.prefill_s if m and m.prefill_s > 0 else 0.0

    @property
    def read_bytes_per_token(self) -> float:
        m = self.measure
        return m.decode_read_bytes / m.decode_tokens if m and m.decode_tokens else 0.0

    @property
    def loader_bps(self) -> float:
        m = self.measure
        return m.loader_bytes / m.loader_busy_s if m and m.loader_busy_s > 0 else 0.0


@dataclass
class ModelReport:
    model: str
    file_bytes: int
    probe_bps: float
    probe_method: str
    cgroup: str                                   # "v1 /sys/fs/cgroup/memory/..." where the groups were made
    reference: CappedResult | None = None
    probe_after_bps: float = 0.0                  # the same probe after the model's runs (0: not yet)
    reference_note: str = ""                      # why there is no reference run
    results: list[CappedResult] = field(default_factory=list)

    @property
    def compute_s_per_token(self) -> float | None:
        r = self.reference
        return r.measure.decode_s / r.measure.decode_tokens if r and r.status == "ok" and r.measure.decode_tokens else None

    def best_plain_llama(self) -> CappedResult | None:
        done = [r for r in self.results if r.name in PLAIN_LLAMA and r.status == "ok"]
        return max(done, key=lambda r: r.decode_tps, default=None)

    def same_tokens(self, r: CappedResult) -> bool | None:
        """Did the run generate the greedy tokens of plain llama.cpp without repack (the kernels the
        budgeted mode runs; the repacked ones may round differently), else of the defaults?"""
        done = {x.name: x for x in self.results if x.name in PLAIN_LLAMA and x.status == "ok"}
        ref = next((done[n] for n in ("llama-norepack", "llama-lazy", "llama") if n in done), None)
        if ref is None or r.status != "ok" or r is ref:
            return None
        return r.measure.tokens == ref.measure.tokens

    def ratio(self, r: CappedResult) -> float | None:
        best = self.best_plain_llama()
        return r.decode_tps / best.decode_tps if best and best.decode_tps > 0 and r.status == "ok" else None

    @property
    def disk_bps(self) -> float:
        """The disk's bandwidth for the bound: the faster of the probes before and after the runs."""
        return max(self.probe_bps, self.probe_after_bps)

    def bound_tps(self, r: CappedResult) -> float | None:
        compute = self.compute_s_per_token
        if compute is None or r.status != "ok" or self.disk_bps <= 0:
            return None
        return bound_tokens_per_s(r.read_bytes_per_token, self.disk_bps, compute)


def bound_tokens_per_s(read_bytes_per_token: float, read_bps: float, compute_s_per_token: float) -> float:
    """1 / (bytes read per token / read bandwidth + compute seconds per token)."""
    if read_bps <= 0 or read_bytes_per_token < 0 or compute_s_per_token < 0:
        raise ValueError("bandwidth must be positive, bytes and compute time non-negative")
    seconds = read_bytes_per_token / read_bps + compute_s_per_token
    return 1.0 / seconds if seconds > 0 else float("inf")


def check_cgroups(root: Path | None = None) -> str:
    """Make and remove one group; returns where groups go. Raises CgroupError (nothing run)."""
    group = MemoryCgroup.create(f"edgemoe-bench-check-{os.getpid()}", 64 * 2**20, root)
    group.remove()
    return f"v{group.version} {group.path.parent}"


def run_capped(models: list[Path], opts: CappedOptions, on_result=None, on_model=None) -> list[ModelReport]:
    from edgemoe.tune.machine import read_cold_bps

    where = check_cgroups(opts.cgroup_root)  # the caller may have checked already: this costs a mkdir
    reports = []
    for model in models:
        size = model.stat().st_size
        bps, method = read_cold_bps(model, 0, size, PROBE_MAX_S, PROBE_STREAMS, PROBE_BLOCK_BYTES)
        report = ModelReport(str(model), size, bps, method, where)
        on_model and on_model(report)
        specs = configurations(model, opts)
        skipped = llama_skip_reason(model)
        if opts.reference:
            report.reference_note = (f"no llama.cpp compute reference ({skipped}); no bound printed" if skipped
                                     else _reference_room(size))
            if not report.reference_note:
                base = replace(specs[0], label="reference: llama.cpp mmap, no repack, warm, uncapped", backend="llama",
                               repack=False, lazy=False, warm=True, budget_bytes=None)
                report.reference = run_one("reference", base, None, opts)
                on_result and on_result(report, report.reference)
        for name, spec in zip(_selected(opts), specs):
            result = CappedResult(spec.label, name, "skipped", skipped) if skipped and name not in ENGINE_RUNS \
                else run_one(name, spec, opts.cap_bytes, opts)
            report.results.append(result)
            on_result and on_result(report, result)
        report.probe_after_bps, _ = read_cold_bps(model, 0, size, PROBE_MAX_S, PROBE_STREAMS, PROBE_BLOCK_BYTES)
        reports.append(report)
    return reports


def configurations(model: Path, opts: CappedOptions) -> list[RunSpec]:
    base = RunSpec("", "llama", str(model), opts.prompt, opts.n_tokens, opts.n_threads, opts.n_ctx)
    out = []
    for name in _selected(opts):
        if name in PLAIN_LLAMA:
            p = PLAIN_LLAMA[name]
            out.append(replace(base, label=p["label"], repack=p["repack"], lazy=p["lazy"]))
        else:  # without --budget each picks its own under the cap, in its own process
            label = f"{MANAGED[name]} {opts.policy}{f'+prefetch({opts.predictor})' if opts.prefetch else ''}"
            out.append(replace(base, label=label, backend=name, budget_bytes=opts.budget_bytes, cap_bytes=opts.cap_bytes,
                               policy=opts.policy, prefetch=opts.prefetch, predictor=opts.predictor,
                               predictor_path=opts.predictor_path))
    return out


def run_one(name: str, spec: RunSpec, cap_bytes: int | None, opts: CappedOptions) -> CappedResult:
    """A fresh child in its own cgroup, the file's pages dropped first (unless the run warms them)."""
    cold = 0 if spec.warm else _drop(spec.model)
    group = MemoryCgroup.create(f"edgemoe-bench-{os.getpid()}-{name}", cap_bytes, opts.cgroup_root)
    argv = group.wrap([sys.executable, "-m", "edgemoe.bench.capped_run", json.dumps(asdict(spec))])
    base = CappedResult(spec.label, name, "failed", budget_bytes=spec.budget_bytes, cold_resident_bytes=cold)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=opts.run_timeout_s)
    except subprocess.TimeoutExpired:
        _kill(group)
        return replace(base, status="timed out", usage=_usage_and_remove(group),
                       detail=f"no result within {opts.run_timeout_s:.0f} s")
    except BaseException:
        _kill(group)
        _usage_and_remove(group)
        raise
    usage = _usage_and_remove(group)
    if done.returncode == 0:
        measure = _parse(done.stdout)
        return replace(base, status="ok", usage=usage, measure=measure, budget_bytes=measure.budget_bytes)
    tail = "\n".join(done.stderr.strip().splitlines()[-6:])
    if usage.oom_kills > 0:
        return replace(base, status="oom-killed", usage=usage, detail=tail)
    return replace(base, usage=usage, detail=f"exit code {done.returncode}: {tail}")


def _drop(path: str, wait_s: float = 3.0) -> int:
    """Drop the file's cached pages; retried for a moment while some remain (a killed run's
    mapping may still be torn down); returns what is left, which the run then reports."""
    deadline = time.monotonic() + wait_s
    while (left := drop_file_cache(path)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def _parse(stdout: str) -> RunMeasure:
    return RunMeasure(**json.loads(stdout.strip().splitlines()[-1]))


def _usage_and_remove(group: MemoryCgroup) -> CgroupUsage:
    try:
        return group.usage()
    finally:
        group.remove()


def _kill(group: MemoryCgroup) -> None:
    for pid in group.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _reference_room(file_bytes: int) -> str:
    """'' when RAM can hold the file in the page cache beside a llama.cpp process, else why not."""
    from edgemoe.tune.machine import meminfo_bytes

    available = meminfo_bytes().get("MemAvailable", 0)
    if available < file_bytes + 2 * 2**30:
        return (f"no compute reference: the file ({file_bytes / 2**30:.1f} GiB) does not fit in the "
                f"{available / 2**30:.1f} GiB of RAM available with room for llama.cpp; no bound printed")
    return ""


def parse_runs(text: str | None) -> tuple[str, ...]:
    """--runs 'llama-lazy,edgemoe' -> the names in RUN_NAMES order (None: all)."""
    if text is None:
        return RUN_NAMES
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in RUN_NAMES]
    if unknown or not names:
        raise InputError(f"unknown --runs name {', '.join(unknown) or repr(text)}; choose from {', '.join(RUN_NAMES)}")
    return tuple(n for n in RUN_NAMES if n in names)


def _selected(opts: CappedOptions) -> list[str]:
    return list(parse_runs(",".join(opts.runs)))
