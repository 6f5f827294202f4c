"""Tables for `edgemoe simulate --compare-predictors` and `edgemoe predictor bench`."""
from __future__ import annotations

from rich.table import Table

from edgemoe.bench.predictors import PredictorRun
from edgemoe.bench.predictor_compare import PredictorResult


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _mib(x: float | None) -> str:
    return "" if x is None else f"{x / 2**20:.3f}"


def add_compare_rows(table: Table, rows: list[PredictorResult], total_bytes: int, share: str = "") -> list[str]:
    """Rows for one budget; returns the notes of predictors that could not be evaluated.
    total_bytes 0: rows combined over traces, each at its own `share`."""
    notes = []
    for r in rows:
        if r.note:
            notes.append(f"{r.predictor}: {r.note}")
        budget, share = ((f"{r.budget_bytes / 2**20:.1f} MiB", f"{100 * r.budget_bytes / total_bytes:.0f}%")
                         if total_bytes else ("each trace's", share))
        table.add_row(budget, share, r.policy,
                      r.predictor, _pct(r.precision), _pct(r.recall), _pct(r.hit_rate), _pct(r.belady_hit_rate),
                      _mib(r.bytes_per_token), _mib(r.prefetch_bytes_per_token), _mib(r.wasted_bytes_per_token),
                      f"{r.misses / r.belady_misses:.2f}x" if r.belady_misses and r.hit_rate is not None else "")
    table.add_section()
    return notes


def compare_table() -> Table:
    return Table("budget", "share", "policy", "predictor", "precision %", "recall %", "hit %", "belady hit %",
                 "MiB read/tok", "prefetch MiB/tok", "wasted MiB/tok", "demand misses vs belady")


def bench_table(runs: list[PredictorRun]) -> Table:
    table = Table("predictor", "decode tok/s (median)", "runs", "hit %", "prefetch issued/tok", "prefetch hits/tok",
                  "wasted/tok", "MiB read/tok", "stall ms/tok", "tokens identical")
    for r in runs:
        n = max(r.decode_tokens, 1)
        table.add_row(r.label, f"{r.median_tps:.1f}", " ".join(f"{t:.0f}" for t in r.decode_tps),
                      f"{100 * r.hit_rate:.1f}", f"{r.prefetch_issued / n:.2f}", f"{r.prefetch_hits / n:.2f}",
                      f"{r.prefetch_wasted / n:.2f}", f"{r.bytes_read / n / 2**20:.3f}", f"{1e3 * r.stall_s / n:.2f}",
                      "yes" if r.tokens_identical else "NO")
    return table
