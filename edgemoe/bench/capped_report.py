"""How `edgemoe bench --max-memory` prints and saves its runs (edgemoe/bench/capped.py)."""
from __future__ import annotations

import os
from dataclasses import asdict

from rich.table import Table

from edgemoe.bench.capped import CappedResult, ModelReport

MIB = 2**20


def model_header(report: ModelReport, cap_bytes: int) -> str:
    compute = report.compute_s_per_token
    ref = report.reference
    lines = [f"{report.model}: {report.file_bytes / 2**30:.2f} GiB, cap {cap_bytes / MIB:.0f} MiB "
             f"(cgroup {report.cgroup})",
             f"  probed read bandwidth: {report.probe_bps / 1e9:.2f} GB/s ({report.probe_method}, 4 streams of "
             f"8 MiB blocks, cold)" + (f"; after the runs {report.probe_after_bps / 1e9:.2f} GB/s (the bound "
                                       f"takes {report.disk_bps / 1e9:.2f})" if report.probe_after_bps else "")]
    if compute is not None:
        lines.append(f"  compute per token: {1e3 * compute:.1f} ms ({ref.label}: {ref.decode_tps:.2f} tok/s, "
                     f"{ref.read_bytes_per_token / MIB:.2f} MiB read/token, "
                     f"{ref.measure.start_resident_bytes / MIB:.0f} of {report.file_bytes / MIB:.0f} MiB cached at start)")
    elif ref is not None:
        lines.append(f"  compute reference run {ref.status}: {ref.detail}; no bound printed")
    elif report.reference_note:
        lines.append(f"  {report.reference_note}")
    if report.file_bytes <= cap_bytes:
        lines.append("  note: the file fits under the cap, so these runs do not measure the capped case")
    return "\n".join(lines)


def result_line(report: ModelReport, r: CappedResult) -> str:
    if r.status != "ok":
        return f"  {r.label}: {r.status}" + (f" ({r.detail.splitlines()[-1]})" if r.detail else "")
    peak = r.usage.peak_bytes / MIB if r.usage else 0.0
    return (f"  {r.label}: decode {r.decode_tps:.2f} tok/s, prefill {r.prefill_tps:.1f} tok/s, peak {peak:.0f} MiB, "
            f"{r.read_bytes_per_token / MIB:.1f} MiB read/token, steal {steal_share(r):.0f}%")


def results_table(report: ModelReport) -> Table:
    table = Table("run", "status", "budget MiB", "cold start", "prefill tok/s", "decode tok/s", "vs best llama.cpp",
                  "peak cgroup MiB", "peak RSS MiB", "OOM kills", "MiB read/tok", "loader MiB/tok", "loader GB/s", "hit %", "same tokens", "bound tok/s", "of bound", "steal %",
                  title=report.model.rsplit("/", 1)[-1])
    for r in report.results:
        ok = r.status == "ok"
        ratio, bound = report.ratio(r), report.bound_tps(r)
        table.add_row(r.label, r.status, "" if r.budget_bytes is None else f"{r.budget_bytes / MIB:.0f}",
                      _cold(r),
                      f"{r.prefill_tps:.1f}" if ok else "", f"{r.decode_tps:.2f}" if ok else "",
                      "" if ratio is None else f"{ratio:.2f}x",
                      f"{r.usage.peak_bytes / MIB:.0f}" if r.usage else "",
                      f"{r.measure.peak_rss_bytes / MIB:.0f}" if ok else "", str(r.usage.oom_kills) if r.usage else "",
                      f"{r.read_bytes_per_token / MIB:.1f}" if ok else "",
                      f"{r.measure.loader_bytes / max(r.measure.decode_tokens, 1) / MIB:.1f}" if ok and r.loader_bps else "",
                      f"{r.loader_bps / 1e9:.2f}" if ok and r.loader_bps else "",
                      f"{100 * r.measure.hits / (r.measure.hits + r.measure.misses):.0f}"
                      if ok and r.measure.hits + r.measure.misses else "",
                      {True: "yes", False: "no", None: ""}[report.same_tokens(r)],
                      "" if bound is None else f"{bound:.2f}",
                      "" if bound is None else f"{100 * r.decode_tps / bound:.0f}%",
                      f"{steal_share(r):.0f}%" if ok else "")
    return table


def steal_share(r: CappedResult) -> float:
    """Steal during the decode as a share of the machine's CPU time then: a run above a few
    percent was slowed by the host, not by the code (compare it with care)."""
    cpus = os.cpu_count() or 1
    return 100 * r.measure.steal_s / (r.measure.decode_s * cpus) if r.measure.decode_s > 0 else 0.0


def _cold(r: CappedResult) -> str:
    """mincore's count of the file's cached bytes as the child started (after the drop; the
    drop's own count where the child reported nothing): 'cold' when none were left."""
    if r.status == "skipped":
        return ""
    cached = r.measure.start_resident_bytes if r.measure else r.cold_resident_bytes
    return "cold" if cached == 0 else f"{cached / MIB:.1f} MiB cached"


def report_dict(report: ModelReport) -> dict:
    """Every measured field plus the derived ones, for --json."""
    def one(r: CappedResult | None) -> dict | None:
        if r is None:
            return None
        return {**asdict(r), "decode_tps": r.decode_tps, "prefill_tps": r.prefill_tps,
                "read_bytes_per_token": r.read_bytes_per_token, "loader_bps": r.loader_bps,
                "ratio_vs_best_llama": report.ratio(r), "bound_tps": report.bound_tps(r),
                "same_tokens_as_llama": report.same_tokens(r)}

    best = report.best_plain_llama()
    return {"model": report.model, "file_bytes": report.file_bytes, "probe_bps": report.probe_bps,
            "probe_after_bps": report.probe_after_bps, "disk_bps": report.disk_bps, "probe_method": report.probe_method, "cgroup": report.cgroup,
            "compute_s_per_token": report.compute_s_per_token, "reference_note": report.reference_note,
            "best_plain_llama": best.label if best else None, "reference": one(report.reference),
            "results": [one(r) for r in report.results]}
