"""`edgemoe tune`: which expert budget, policy and prefetch setting runs fastest on this laptop
under a memory cap.

1. Measure the machine (RAM, cores, GPUs, read speeds of the model file) and the model's fixed
   memory (runtime, dense weights, KV cache).
2. Record a routing trace on the prompts (and the prefetcher's predictions); `traces` adds more
   traces of the same model (a file or a folder, e.g. `edgemoe trace --backend llama` of other text).
3. Replay them through every budget x policy x prefetch (edgemoe.simulate): hit rates, bytes read
   (with several traces their sum, and each trace's hit rate for the report).
4. Calibrate the cost model with real runs (largest eligible budget; one prefetch run) and
   predict tokens/s and peak RSS of every setting; settings over the cap are excluded.
5. Confirm the best few with real runs (a fresh process each: clean peak RSS), recommend the
   smallest-memory setting within `tolerance` of the fastest measured one.
Ctrl-C during 2-5 keeps what was gathered: the recommendation then rests on what was measured
(or, before any confirmation, on the predictions).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgemoe.errors import InputError
from edgemoe.expert_store import find_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.tune.machine import MachineInfo, probe_machine
from edgemoe.tune.profile import SELECTABLE_POLICIES
from edgemoe.simulate import simulate, total as total_result
from edgemoe.trace import Trace, TraceError, load_traces
from edgemoe.tune.cost_model import (CostModel, MemoryPlan, Row, Setting, calibrate, calibrate_prefetch, recommend,
                                to_confirm)
from edgemoe.tune.runs import ModelFacts, RunFailed, RunRequest, RunResult, run_facts, run_measure

DEFAULT_SHARES = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
DEFAULT_PROMPTS = (
    "The os module provides a portable way of using operating system dependent functionality.",
    "def read_file(path):\n    \"\"\"Return the contents of the file at path.\"\"\"",
    "Return the number of items in a container. If the argument is a mapping, the keys are counted.",
)


class TuneError(InputError):
    """Nothing to tune: e.g. no budget fits under the memory cap."""


@dataclass(frozen=True)
class TuneOptions:
    model: Path
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    n_tokens: int = 32                 # generated per prompt
    max_memory_bytes: int | None = None  # None: RAM available when probed
    shares: tuple[float, ...] = DEFAULT_SHARES
    policies: tuple[str, ...] = SELECTABLE_POLICIES
    confirm: int = 3                   # settings confirmed by real runs; < 0: every eligible one
    repeats: int = 2                   # runs per measured setting, interleaved; the fastest counts
    tolerance: float = 0.05            # a smaller budget within this of the fastest is preferred
    top_n: int = 3                     # with confirm < 0: the predicted top-n the validation checks
    threads: int | None = None
    ctx: int = 512
    isolated: bool = True              # each run in a fresh process
    work_dir: Path | None = None       # trace files; default a temporary folder
    traces: Path | None = None         # more traces of this model to replay beside the recorded one


@dataclass
class TuneResult:
    options: TuneOptions
    machine: MachineInfo | None = None
    facts: ModelFacts | None = None
    memory: MemoryPlan | None = None
    cap_bytes: int = 0
    cost: CostModel | None = None
    rows: list[Row] = field(default_factory=list)        # selectable settings
    bounds: list[Row] = field(default_factory=list)      # belady per budget: the offline optimum
    excluded_budgets: dict[int, str] = field(default_factory=dict)
    reference_tokens: list[int] = field(default_factory=list)
    recommended: Row | None = None
    recommended_by: str = ""                             # "measured" | "predicted" | ""
    validation: dict | None = None
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    failed: str = ""                  # why a measuring run died and the sweep stopped early
    trace_path: Path | None = None
    threads: int | None = None                           # chosen by the calibration (or --threads)
    calibration_rows: list[Row] = field(default_factory=list)
    # with several traces: per trace name, each selectable setting's replayed hit rate (Setting.label())
    trace_hit_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    thread_runs: dict[int, RunResult] = field(default_factory=dict)

    @property
    def expert_bytes_total(self) -> int:
        return sum(self.facts.expert_bytes.values()) if self.facts else 0

    def measured_rows(self) -> list[Row]:
        return [r for r in self.rows if r.runs]


class NullProgress:
    """What `tune` reports to: a stage with a step count, then one advance per step."""

    def stage(self, description: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass


def budget_grid(total: int, largest: int, shares, max_budget: int) -> tuple[list[int], dict[int, str]]:
    """Budgets to replay (shares of all expert bytes, plus the largest under the cap) and those
    excluded with the reason."""
    grid = {int(total * s) for s in shares}
    if largest <= max_budget < total and all(abs(b - max_budget) > 0.01 * total for b in grid):
        grid.add(max_budget)
    budgets = sorted(grid, reverse=True)
    excluded = {b: f"below the largest expert ({largest / 2**20:.1f} MiB)" for b in budgets if b < largest}
    return [b for b in budgets if b >= largest], excluded


def tune(opts: TuneOptions, progress=NullProgress()) -> TuneResult:
    res = TuneResult(opts)
    progress.stage("measuring the machine", 2)
    res.facts = run_facts(str(opts.model), opts.ctx, opts.isolated)
    progress.advance()
    res.machine = probe_machine(opts.model, find_experts(GGUFFile(opts.model)))
    progress.advance()
    res.memory = MemoryPlan(res.facts.runtime_bytes, res.facts.dense_bytes, res.facts.kv_bytes)
    res.cap_bytes = opts.max_memory_bytes or res.machine.ram_available_bytes
    sizes = res.facts.expert_bytes
    budgets, res.excluded_budgets = budget_grid(sum(sizes.values()), max(sizes.values()), opts.shares,
                                                res.memory.max_budget(res.cap_bytes))
    for b in budgets:
        if res.memory.need_bytes(b) > res.cap_bytes:
            res.excluded_budgets[b] = (f"needs {res.memory.need_bytes(b) / 2**20:.0f} MiB "
                                       f"({res.memory.explain(b)}) > cap {res.cap_bytes / 2**20:.0f} MiB")
    eligible = [b for b in budgets if b not in res.excluded_budgets]
    if not eligible:
        smallest = min(budgets)
        raise TuneError(f"no expert budget fits under the memory cap of {res.cap_bytes / 2**20:.0f} MiB: even "
                        f"{smallest / 2**20:.0f} MiB needs {res.memory.need_bytes(smallest) / 2**20:.0f} MiB "
                        f"({res.memory.explain(smallest)}); raise --max-memory")
    try:
        _sweep(res, budgets, eligible, progress)
    except KeyboardInterrupt:
        res.interrupted = True
        res.notes.append("interrupted: the results below are what was gathered before Ctrl-C")
    except RunFailed as exc:  # keep what was measured; the failing run's stderr tail is in the message
        res.failed = str(exc)
        res.notes.append(f"stopped early, a measuring run failed: {exc}")
    _conclude(res)
    return res


def _request(res: TuneResult, setting: Setting | None, **kw) -> RunRequest:
    o = res.options
    return RunRequest(str(o.model), tuple(o.prompts), o.n_tokens, setting.budget_bytes if setting else None,
                      setting.policy if setting else "lru", setting.prefetch if setting else False,
                      res.threads or o.threads, o.ctx, **kw)


def _sweep(res: TuneResult, budgets: list[int], eligible: list[int], progress) -> None:
    opts = res.options
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="edgemoe-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    progress.stage("recording routing", 1)
    top = Setting(eligible[0], "lru", False)
    res.trace_path = work / "trace.json"
    res.reference_tokens = run_measure(_request(res, top, record_path=str(res.trace_path)), opts.isolated).tokens
    traces = [(res.trace_path, Trace.load(res.trace_path))] + _more_traces(opts.traces, res.facts.expert_bytes)
    predictions = [prefetch_schedule(t) for _, t in traces]
    progress.advance()

    total = res.expert_bytes_total
    progress.stage("simulating", len(budgets) * (2 * len(opts.policies) + 1))
    for b in budgets:
        excluded = res.excluded_budgets.get(b, "")
        demand_only = {}
        for prefetch in (False, True):
            for p in opts.policies:
                sim = _replay(res, traces, b, p, predictions if prefetch else None)
                demand_only.setdefault(p, sim)
                res.rows.append(Row(Setting(b, p, prefetch), b / total, sim, res.memory.need_bytes(b),
                                    demand_only[p] if prefetch else None, excluded=excluded))
                progress.advance()
        res.bounds.append(Row(Setting(b, "belady", False), b / total, _replay(res, traces, b, "belady", None),
                              res.memory.need_bytes(b), excluded="offline bound: needs the future accesses"))
        progress.advance()

    _calibrate(res, top, eligible, progress)
    for row in res.rows + res.bounds:
        row.predicted_tps = res.cost.tokens_per_s(row.sim, row.need_bytes, row.demand_only)

    chosen = to_confirm(res.rows, opts.confirm, opts.tolerance)
    progress.stage("confirming with real runs", sum(max(opts.repeats - len(r.runs), 0) for r in chosen))
    _measure_rounds(res, chosen, opts.repeats, progress)


def _more_traces(path: Path | None, expert_bytes: dict) -> list:
    """TuneOptions.traces, checked to be this model's routing (the same experts)."""
    if path is None:
        return []
    traces = load_traces(path)
    for p, t in traces:
        if set(t.expert_bytes) != set(expert_bytes):
            raise TraceError(f"{p} is routing of another model ({t.model}: {len(t.moe_layers)} MoE layers x "
                             f"{t.n_experts} experts); give traces of the model being tuned")
    return traces


def _replay(res: TuneResult, traces: list, budget: int, policy: str, predictions: list | None):
    """One setting over every trace: the summed result; each trace's hit rate is kept for the
    report when there are several."""
    sims = [simulate(t, budget, policy, prefetch=predictions[i] if predictions else None)
            for i, (_, t) in enumerate(traces)]
    if len(traces) > 1 and policy != "belady":
        label = Setting(budget, policy, predictions is not None).label()
        for (path, _), sim in zip(traces, sims):
            res.trace_hit_rates.setdefault(path.name, {})[label] = sim.hit_rate
    return total_result(sims) if len(sims) > 1 else sims[0]


def _measure_rounds(res: TuneResult, rows: list[Row], repeats: int, progress) -> None:
    """Until each row has `repeats` runs, one run per row per round: a burst of load elsewhere on
    the machine then costs one run of several settings, not every run of one."""
    for _ in range(repeats):
        for row in rows:
            if len(row.runs) < repeats:
                _measure(res, row)
                progress.advance()


def prefetch_schedule(trace: Trace, predictor: str | None = None) -> list:
    """What the engine's prefetcher would load (by default with EngineConfig's predictor), per
    step and layer, replayed from the trace's routing and router look-ahead logits."""
    from edgemoe.engine import EngineConfig
    from edgemoe.predictor.base import RoutingShape, make_predictor
    from edgemoe.bench.predictor_compare import schedule

    name = predictor or EngineConfig().predictor
    return schedule(trace, make_predictor(name, RoutingShape.of_trace(trace))).loads


def _calibrate(res: TuneResult, top: Setting, eligible: list[int], progress) -> None:
    """Base time per token at the largest eligible budget for each candidate thread count (the
    fastest is kept), then lru without and with prefetch at the middle budget below it: the read
    cost per byte, then the prefetch effect and factor. Each from the fastest of `repeats` runs."""
    m, total, repeats = res.machine, res.expert_bytes_total, res.options.repeats
    counts = [res.options.threads] if res.options.threads else sorted({m.cores, max(m.cores // 2, 1)}, reverse=True)
    partial = [b for b in eligible if b < top.budget_bytes]
    mid = partial[len(partial) // 2] if partial else None
    progress.stage("calibrating the cost model", repeats * (len(counts) + (2 if mid else 0)))
    by_threads: dict[int, list[RunResult]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            by_threads[n].append(_run(res, top, n))
            progress.advance()
    res.thread_runs = {n: max(runs, key=lambda r: r.tokens_per_s) for n, runs in by_threads.items()}
    res.threads = max(counts, key=lambda n: res.thread_runs[n].tokens_per_s)
    base_row = _row(res, top)
    for run in by_threads[res.threads]:
        _record_run(res, base_row, run)
    res.calibration_rows.append(base_row)
    other = pf_row = None
    if mid is not None:
        other, pf_row = _row(res, Setting(mid, "lru", False)), _row(res, Setting(mid, "lru", True))
        res.calibration_rows += [other, pf_row]
        _measure_rounds(res, [other, pf_row], repeats, progress)
    res.cost = calibrate(base_row.best_run, base_row.need_bytes, m.read_warm_bps, m.read_cold_bps,
                         m.ram_available_bytes, total, other.best_run if other else None)
    if pf_row is not None:
        fitted = calibrate_prefetch(res.cost, pf_row.best_run, pf_row.sim, pf_row.demand_only,
                                    total / len(res.facts.expert_bytes), pf_row.need_bytes)
        if fitted is not res.cost:
            res.cost = fitted
            return
    res.notes.append("prefetch not calibrated (no eligible budget where prefetches read): factor and effect 1.0")


def _row(res: TuneResult, setting: Setting) -> Row:
    return next(r for r in res.rows if r.setting == setting)


def _run(res: TuneResult, setting: Setting, threads: int | None = None) -> RunResult:
    req = replace(_request(res, setting, trace_path=str(res.trace_path)), threads=threads or res.threads)
    return run_measure(req, res.options.isolated)


def _measure(res: TuneResult, row: Row) -> None:
    _record_run(res, row, _run(res, row.setting))


def _record_run(res: TuneResult, row: Row, run: RunResult) -> None:
    row.runs.append(run)
    if run.tokens != res.reference_tokens:
        res.notes.append(f"{row.setting.label()}: generated tokens differ from the recorded trace's, so its "
                         f"simulated numbers do not apply to it")
    if run.peak_rss_bytes > res.cap_bytes and not row.excluded:
        row.excluded = f"measured peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB > cap {res.cap_bytes / 2**20:.0f} MiB"


def _conclude(res: TuneResult) -> None:
    measured = res.measured_rows()
    opts = res.options
    if measured:
        res.recommended, res.recommended_by = recommend(measured, lambda r: r.measured_tps, opts.tolerance), "measured"
    if res.recommended is None and res.cost is not None:
        res.recommended = recommend(res.rows, lambda r: r.predicted_tps, opts.tolerance)
        res.recommended_by = "predicted" if res.recommended else ""
    if opts.confirm < 0 and res.cost is not None and measured:
        res.validation = validate(res)


def validate(res: TuneResult) -> dict:
    """With every eligible setting measured: would a default run (calibration runs + the predicted
    top-n confirmed) have recommended a setting within 10% of the best measured one?"""
    opts = res.options
    subset = to_confirm(res.rows, opts.top_n, opts.tolerance) + res.calibration_rows  # what a default run measures
    measured = [r for r in res.measured_rows() if not r.excluded]
    pick = recommend([r for r in subset if r.runs], lambda r: r.measured_tps, opts.tolerance)
    best = max(measured, key=lambda r: r.measured_tps)
    errors = [abs(r.predicted_tps - r.measured_tps) / r.measured_tps for r in measured if r.measured_tps]
    return {"top_n": opts.top_n, "recommended": pick.setting.label() if pick else None,
            "recommended_tps": pick.measured_tps if pick else None,
            "best": best.setting.label(), "best_tps": best.measured_tps,
            "ratio": (pick.measured_tps / best.measured_tps) if pick and best.measured_tps else None,
            "settings_measured": len(measured),
            "prediction_error_median": sorted(errors)[len(errors) // 2] if errors else None,
            "prediction_error_max": max(errors) if errors else None}
