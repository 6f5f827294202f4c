"""What `edgemoe tune` shows and writes: the table, the summary, the profile, the JSON results."""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from edgemoe import __version__
from edgemoe.tune.profile import Profile, save_profile
from edgemoe.tune.sweep import TuneResult
from edgemoe.tune.cost_model import Row, order_key

MIB = 2**20


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / MIB:.0f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def shown_rows(res: TuneResult, every: bool = False) -> list[Row]:
    """Per eligible budget: the best predicted policy without and with prefetch, and every
    measured row; per budget over the cap, its best predicted row (every=True: all rows)."""
    if every:
        return sorted(res.rows, key=lambda r: (-r.setting.budget_bytes, order_key(r)))
    keep = {id(r) for r in res.rows if r.runs or r is res.recommended}
    for budget in {r.setting.budget_bytes for r in res.rows}:
        for prefetch in (False, True):
            group = [r for r in res.rows if r.setting.budget_bytes == budget and r.setting.prefetch == prefetch]
            if prefetch and group[0].excluded:
                continue
            keep.add(id(max(group, key=lambda r: (r.predicted_tps, -order_key(r)[2]))))
    return sorted((r for r in res.rows if id(r) in keep), key=lambda r: (-r.setting.budget_bytes, order_key(r)))


def _short(why: str) -> str:
    """The table's note: the reason's head (the summary lists it in full)."""
    return "over cap" if why.startswith("needs") else why.split(":")[0].split(" (")[0]


def table(res: TuneResult, every: bool = False) -> Table:
    """Hit rates: replayed (sim), measured (meas), Belady's demand-only bound (bel)."""
    t = Table("budget MiB", "share", "policy", "prefetch", "hit% sim", "hit% meas", "hit% bel", "tok/s pred",
              "tok/s meas", "RSS MiB pred", "RSS MiB meas", "note")
    belady = {r.setting.budget_bytes: r.sim.hit_rate for r in res.bounds}
    last = None
    for r in shown_rows(res, every):
        s = r.setting
        if last is not None and s.budget_bytes != last:
            t.add_section()
        last = s.budget_bytes
        note = "RECOMMENDED" if r is res.recommended else _short(r.excluded)
        t.add_row(f"{s.budget_bytes / MIB:.1f}", f"{100 * r.share:.0f}%", s.policy, "on" if s.prefetch else "off",
                  _pct(r.sim.hit_rate), _pct(r.measured_hit_rate), _pct(belady.get(s.budget_bytes)),
                  f"{r.predicted_tps:.1f}" if r.predicted_tps else "",
                  "" if r.measured_tps is None else f"{r.measured_tps:.1f}", _mib(r.need_bytes),
                  _mib(r.measured_peak_bytes), note)
    return t


def trace_table(res: TuneResult) -> Table | None:
    """With several traces: each eligible budget's replayed hit % per policy (without and with
    prefetch) per trace, beside their sum (overall); None with one trace."""
    if not res.trace_hit_rates:
        return None
    names = list(res.trace_hit_rates)
    t = Table("budget MiB", "policy", "prefetch", *(f"hit% {n}" for n in names), "hit% overall",
              title="replayed hit rate per trace")
    last = None
    for r in sorted((r for r in res.rows if not r.excluded), key=lambda r: (-r.setting.budget_bytes, order_key(r))):
        s = r.setting
        if last is not None and s.budget_bytes != last:
            t.add_section()
        last = s.budget_bytes
        t.add_row(f"{s.budget_bytes / MIB:.1f}", s.policy, "on" if s.prefetch else "off",
                  *(_pct(res.trace_hit_rates[n].get(s.label())) for n in names), _pct(r.sim.hit_rate))
    return t


def summary(res: TuneResult) -> list[str]:
    lines = []
    m, f = res.machine, res.facts
    if m:
        lines.append(f"machine: {m.cores} cores, RAM {m.ram_available_bytes / 2**30:.1f} GiB available of "
                     f"{m.ram_total_bytes / 2**30:.1f} GiB, GPUs: {', '.join(m.gpus) or 'none'} "
                     f"(ggml backends: {', '.join(m.ggml_backends)}); expert reads {m.read_warm_bps / 1e9:.2f} GB/s "
                     f"from page cache, {m.read_cold_bps / 1e9:.2f} GB/s from disk ({m.read_cold_method})")
    if f and res.memory:
        source = "--max-memory" if res.options.max_memory_bytes else "RAM available"
        lines.append(f"memory: {res.memory.explain(0).replace('budget 0 + ', '')} fixed + budget; cap "
                     f"{res.cap_bytes / MIB:.0f} MiB ({source})"
                     f"; all experts {res.expert_bytes_total / MIB:.1f} MiB")
    for budget, why in sorted(res.excluded_budgets.items(), reverse=True):
        lines.append(f"excluded: budget {budget / MIB:.1f} MiB ({100 * budget / max(res.expert_bytes_total, 1):.0f}%), "
                     f"every policy: {why}")
    for r in res.rows:
        if r.excluded.startswith("measured"):
            lines.append(f"excluded: {r.setting.label()}: {r.excluded}")
    if res.thread_runs:
        lines.append("threads (largest eligible budget): " + ", ".join(
            f"{n} → {r.tokens_per_s:.1f} tok/s" for n, r in res.thread_runs.items()) + f"; using {res.threads}")
    if res.cost:
        c = res.cost
        lines.append(f"cost model: {1e3 * c.base_s:.2f} ms/token base + missed bytes at "
                     f"{1 / c.warm_s_per_byte / 1e9:.2f} GB/s cached, {1 / c.cold_s_per_byte / 1e9:.2f} GB/s from disk (read cost from {c.read_source}); "
                     f"prefetch delivers {100 * c.prefetch_effect:.0f}% of the replay's extra hits and a "
                     f"prefetched byte costs {c.prefetch_factor:.2f}x a missed one")
    errors = [(r.predicted_tps - r.measured_tps) / r.measured_tps for r in res.measured_rows() if r.measured_tps]
    if errors:
        lines.append(f"predicted vs measured tokens/s over {len(errors)} measured settings: "
                     + ", ".join(f"{100 * e:+.0f}%" for e in errors))
    if res.recommended:
        r = res.recommended
        speed = r.measured_tps if res.recommended_by == "measured" else r.predicted_tps
        lines.append(f"recommended ({res.recommended_by}): budget {r.setting.budget_bytes / MIB:.1f} MiB "
                     f"({100 * r.share:.0f}% of experts), policy {r.setting.policy}, prefetch "
                     f"{'on' if r.setting.prefetch else 'off'}: {speed:.1f} tokens/s, hit rate "
                     f"{100 * (r.measured_hit_rate if r.runs else r.sim.hit_rate):.1f}%, peak RSS "
                     f"{(r.measured_peak_bytes or r.need_bytes) / MIB:.0f} MiB")
    else:
        lines.append("no recommendation: nothing was simulated or measured")
    v = res.validation
    if v and v["ratio"] is not None:
        lines.append(f"validation: {v['settings_measured']} eligible settings measured; recommending from the "
                     f"predicted top {v['top_n']} gives {v['recommended']} at {v['recommended_tps']:.1f} tok/s = "
                     f"{100 * v['ratio']:.0f}% of the best measured ({v['best']}, {v['best_tps']:.1f} tok/s); "
                     f"prediction error median {100 * v['prediction_error_median']:.0f}%, "
                     f"max {100 * v['prediction_error_max']:.0f}%")
    return lines + res.notes


def to_profile(res: TuneResult) -> Profile | None:
    r = res.recommended
    if r is None:
        return None
    o, m = res.options, res.machine
    measured = {} if not r.runs else {"tokens_per_s": round(r.measured_tps, 3),
                                      "hit_rate": round(r.measured_hit_rate, 4),
                                      "peak_rss_bytes": r.measured_peak_bytes}
    machine = {} if m is None else {"cores": m.cores, "ram_total_bytes": m.ram_total_bytes,
                                    "ram_available_bytes": m.ram_available_bytes, "gpus": list(m.gpus),
                                    "read_warm_bps": round(m.read_warm_bps), "read_cold_bps": round(m.read_cold_bps)}
    return Profile(model=str(Path(o.model).resolve()), budget_bytes=r.setting.budget_bytes, policy=r.setting.policy,
                   prefetch=r.setting.prefetch, threads=res.threads or o.threads, ctx=o.ctx,
                   model_bytes=os.path.getsize(o.model), budget_share=round(r.share, 4),
                   confirmed=bool(r.runs), created_by=f"edgemoe tune {__version__}",
                   created_at=datetime.datetime.now().isoformat(timespec="seconds"),
                   max_memory_bytes=res.cap_bytes, measured=measured,
                   predicted={"tokens_per_s": round(r.predicted_tps, 3), "hit_rate": round(r.sim.hit_rate, 4),
                              "peak_rss_bytes": r.need_bytes},
                   machine=machine)


def _row_dict(r: Row) -> dict:
    return {"budget_bytes": r.setting.budget_bytes, "share": r.share, "policy": r.setting.policy,
            "prefetch": r.setting.prefetch, "sim_hit_rate": r.sim.hit_rate,
            "sim_bytes_per_token": r.sim.bytes_per_token, "predicted_tps": r.predicted_tps,
            "predicted_peak_rss_bytes": r.need_bytes, "excluded": r.excluded,
            "runs": [{k: v for k, v in asdict(run).items() if k != "tokens"} | {"tokens_per_s": run.tokens_per_s,
                                                                              "hit_rate": run.hit_rate}
                     for run in r.runs]}


def result_dict(res: TuneResult) -> dict:
    return {"model": str(res.options.model), "prompts": list(res.options.prompts), "n_tokens": res.options.n_tokens,
            "cap_bytes": res.cap_bytes, "interrupted": res.interrupted,
            "machine": asdict(res.machine) if res.machine else None,
            "memory": asdict(res.memory) if res.memory else None, "cost": asdict(res.cost) if res.cost else None,
            "excluded_budgets": {str(b): why for b, why in res.excluded_budgets.items()},
            "rows": [_row_dict(r) for r in res.rows], "belady": [_row_dict(r) for r in res.bounds],
            "recommended": _row_dict(res.recommended) if res.recommended else None,
            "recommended_by": res.recommended_by, "validation": res.validation, "notes": res.notes,
            "trace_hit_rates": res.trace_hit_rates}


def write_outputs(res: TuneResult, out_dir: Path, plot: bool = True) -> dict[str, Path]:
    """profile.yaml (when there is a recommendation), tune.json, tune.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    profile = to_profile(res)
    if profile is not None:
        written["profile"] = save_profile(profile, out_dir / "profile.yaml")
    (out_dir / "tune.json").write_text(json.dumps(result_dict(res), indent=1))
    written["results"] = out_dir / "tune.json"
    if plot and any(r.predicted_tps for r in res.rows):
        from edgemoe.tune.plot import save_png
        written["plot"] = save_png(res, out_dir / "tune.png")
    return written


class RichProgress:
    """tune's progress (stage, advance) on a rich Progress bar: one task per stage."""

    def __init__(self, bar):
        self.bar, self.task, self.total = bar, None, 0

    def stage(self, description: str, total: int) -> None:
        if self.task is not None:  # a stage cut short (settings shared a run) still shows as done
            self.bar.update(self.task, completed=self.total)
        self.task, self.total = self.bar.add_task(description, total=max(total, 1)), max(total, 1)

    def advance(self) -> None:
        self.bar.advance(self.task)
