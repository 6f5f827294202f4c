"""The pure part of `edgemoe tune`: the memory formula, the cost model that turns a simulated
setting into predicted tokens/s, which settings to confirm, and the recommendation rule.

Memory: a setting needs runtime + dense + budget + KV + slack bytes (runtime measured: Python,
torch, ggml and an opened engine less its dense weights; slack: measured, see SLACK_BYTES). Prefetches
count inside the budget, so prefetch adds nothing.

Time per decode token = base + demand bytes x read cost + prefetch factor x prefetch bytes x read
cost. base (dense + expert compute + glue) is measured by a run whose bytes read are subtracted;
the read cost is the slope between two runs that read different amounts (else the probe's read
speed), mixing page-cache and disk reads by how much of the expert bytes the page cache can hold
next to the process. A prefetch run gives the prefetch effect (the share of the replay's extra
hits the engine delivers) and factor (how much of a prefetched byte's read time a token still
pays: 0 = hidden, 1 = serial, >1 = contention).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from edgemoe.simulate import SimResult
from edgemoe.tune.runs import RunResult

# what a running engine adds beyond runtime (now measured after open) + dense + budget + KV, and
# what a memory cgroup charges besides RSS (page tables, the file's unmapped cached pages): graph
# buffers and bounce buffers measured 21-47 MiB on the Qwen3 slices (2026-12-01); with 80 MiB the
# mixed Qwen3 slice under a 3 GiB cap sat at the cap and re-read dense pages (137 MiB/token from
# the device vs 28 by its loader)
SLACK_BYTES = 128 * 2**20
MIN_SLOPE, MAX_SLOPE = 0.25, 50.0  # engine read cost per byte accepted, relative to the probe's
POLICY_ORDER = ("split", "lru", "lfu", "hybrid", "random", "belady")  # ties: the default policy first


@dataclass(frozen=True)
class Setting:
    budget_bytes: int
    policy: str
    prefetch: bool

    def label(self) -> str:
        return f"{self.budget_bytes / 2**20:.1f} MiB {self.policy}{'+prefetch' if self.prefetch else ''}"


@dataclass(frozen=True)
class MemoryPlan:
    runtime_bytes: int
    dense_bytes: int
    kv_bytes: int
    slack_bytes: int = SLACK_BYTES

    @property
    def fixed_bytes(self) -> int:
        return self.runtime_bytes + self.dense_bytes + self.kv_bytes + self.slack_bytes

    def need_bytes(self, budget_bytes: int) -> int:
        return self.fixed_bytes + budget_bytes

    def max_budget(self, cap_bytes: int) -> int:
        return cap_bytes - self.fixed_bytes

    def explain(self, budget_bytes: int) -> str:
        mib = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
        return (f"runtime {mib(self.runtime_bytes)} + dense {mib(self.dense_bytes)} + budget {mib(budget_bytes)}"
                f" + KV {mib(self.kv_bytes)} + slack {mib(self.slack_bytes)} MiB")


@dataclass(frozen=True)
class CostModel:
    base_s: float                 # per decode token, no expert reads
    warm_s_per_byte: float        # a missed byte read from the page cache, as the engine reads it
    cold_s_per_byte: float        # ... from the disk
    ram_available_bytes: int
    expert_bytes_total: int
    prefetch_factor: float = 1.0
    prefetch_effect: float = 1.0  # share of the replay's prefetch hits the engine's racing thread delivers
    read_source: str = "probe"    # "engine runs": fitted on two measured runs; "probe": the read probe

    def read_s_per_byte(self, need_bytes: int) -> float:
        """Page cache left next to the process holds this share of the experts; the rest read cold."""
        room = self.ram_available_bytes - need_bytes
        cached = min(max(room / max(self.expert_bytes_total, 1), 0.0), 1.0)
        return cached * self.warm_s_per_byte + (1 - cached) * self.cold_s_per_byte

    def token_s(self, demand_bytes: float, prefetch_bytes: float, need_bytes: int) -> float:
        c = self.read_s_per_byte(need_bytes)
        return self.base_s + c * demand_bytes + self.prefetch_factor * c * prefetch_bytes

    def tokens_per_s(self, sim: SimResult, need_bytes: int, demand_only: SimResult | None = None) -> float:
        """demand_only: the same setting replayed without prefetch; the demand bytes prefetching
        saves then count at `prefetch_effect`."""
        n = max(sim.tokens, 1)
        pf, demand = sim.prefetch_bytes / n, (sim.bytes_read - sim.prefetch_bytes) / n
        if demand_only is not None:
            demand = demand_only.bytes_per_token - self.prefetch_effect * (demand_only.bytes_per_token - demand)
        return 1.0 / self.token_s(demand, pf, need_bytes)


def calibrate(base: RunResult, base_need: int, warm_bps: float, cold_bps: float, ram_available: int,
              expert_total: int, other: RunResult | None = None) -> CostModel:
    """base: a run without prefetch at the largest budget (few reads); other: one at a smaller
    budget (more reads). The read cost per byte is the slope between them when `other` read
    clearly more (it then includes what the probe does not see: per-miss overhead, a layer's
    experts computed one by one under a tight budget); else the probe's. base_s is the base run's
    time per token minus its reads."""
    probe_warm = 1.0 / warm_bps
    probe_cold = 1.0 / cold_bps if cold_bps > 0 else probe_warm
    candidates = [(probe_warm, "probe")]
    if other is not None and other.tokens_per_s > 0 and base.tokens_per_s > 0:
        extra_bytes = other.bytes_per_token - base.bytes_per_token
        slope = (1.0 / other.tokens_per_s - 1.0 / base.tokens_per_s) / extra_bytes if extra_bytes > 0 else 0.0
        # a slope far from the probe's is the noise of a busy machine, not a read cost
        if extra_bytes > 0.05 * max(other.bytes_per_token, 1) and MIN_SLOPE <= slope / probe_warm <= MAX_SLOPE:
            candidates.insert(0, (slope, "engine runs"))
    for warm, source in candidates:
        model = CostModel(0.0, warm, warm + max(probe_cold - probe_warm, 0.0), ram_available, expert_total,
                          read_source=source)
        base_s = 1.0 / base.tokens_per_s - model.read_s_per_byte(base_need) * base.bytes_per_token
        if base_s > 0:
            break
    return replace(model, base_s=max(base_s, 0.0))


def calibrate_prefetch(model: CostModel, run: RunResult, sim: SimResult, demand_only: SimResult,
                       expert_bytes_mean: float, need_bytes: int) -> CostModel:
    """Fit a measured prefetch run (sim, demand_only: its setting replayed with and without
    prefetch): the prefetch effect from its hit rate (clamped to [0, 1]), then the prefetch factor
    from its time with its own measured demand bytes (clamped to [0, 4]). Unchanged when the run
    read too little by prefetch to tell."""
    gain = sim.hit_rate - demand_only.hit_rate
    effect = min(max((run.hit_rate - demand_only.hit_rate) / gain, 0.0), 1.0) if gain > 0.01 else 1.0
    demand = min(run.misses * expert_bytes_mean, run.bytes_read) / max(run.decode_tokens, 1)
    prefetched = run.bytes_per_token - demand
    if prefetched <= 0.01 * max(run.bytes_per_token, 1) or run.tokens_per_s <= 0:
        return model
    c = model.read_s_per_byte(need_bytes)
    factor = (1.0 / run.tokens_per_s - model.base_s - c * demand) / (c * prefetched)
    return replace(model, prefetch_factor=min(max(factor, 0.0), 4.0), prefetch_effect=effect)


@dataclass
class Row:
    """One setting: simulated, predicted, and (once confirmed) measured."""
    setting: Setting
    share: float                      # of all expert bytes
    sim: SimResult
    need_bytes: int                   # predicted peak RSS
    demand_only: SimResult | None = None  # prefetch rows: the same setting replayed without prefetch
    predicted_tps: float = 0.0
    excluded: str = ""                # why it may not be recommended ("" = eligible)
    runs: list[RunResult] = field(default_factory=list)

    @property
    def best_run(self) -> RunResult | None:
        """The fastest of the repeats: on a shared machine the least disturbed run is the closest
        to what the setting can do."""
        return max(self.runs, key=lambda r: r.tokens_per_s) if self.runs else None

    @property
    def measured_tps(self) -> float | None:
        return self.best_run.tokens_per_s if self.runs else None

    @property
    def measured_hit_rate(self) -> float | None:
        return sum(r.hit_rate for r in self.runs) / len(self.runs) if self.runs else None

    @property
    def measured_peak_bytes(self) -> int | None:
        return max(r.peak_rss_bytes for r in self.runs) if self.runs else None

    def outcome(self) -> tuple:
        """Settings with the same outcome key behave the same (e.g. every policy when all fits)."""
        s = self.sim
        return (self.setting.budget_bytes, self.setting.prefetch, s.hits, s.misses, s.bytes_read)


def order_key(row: Row) -> tuple:
    s = row.setting
    return (s.budget_bytes, s.prefetch, POLICY_ORDER.index(s.policy) if s.policy in POLICY_ORDER else 99)


def recommend(rows: list[Row], speed, tolerance: float) -> Row | None:
    """The smallest-memory eligible setting within `tolerance` of the fastest (by `speed(row)`):
    memory left to the rest of the laptop is worth a few percent of speed."""
    candidates = [r for r in rows if not r.excluded and (speed(r) or 0) > 0]
    if not candidates:
        return None
    best = max(speed(r) for r in candidates)
    near = [r for r in candidates if speed(r) >= (1 - tolerance) * best]
    return min(near, key=lambda r: (order_key(r), -speed(r)))


def distinct(rows: list[Row]) -> list[Row]:
    """One row per outcome (the first in `order_key` order)."""
    seen, out = set(), []
    for r in sorted(rows, key=order_key):
        if r.outcome() not in seen:
            seen.add(r.outcome())
            out.append(r)
    return out


def to_confirm(rows: list[Row], n: int, tolerance: float) -> list[Row]:
    """The predicted recommendation plus the next best predicted, one per outcome, `n` in all
    (n < 0: every eligible outcome)."""
    eligible = distinct([r for r in rows if not r.excluded])
    ranked = sorted(eligible, key=lambda r: (-r.predicted_tps, order_key(r)))
    if n < 0:
        return ranked
    first = recommend(eligible, lambda r: r.predicted_tps, tolerance)
    picked = [first] if first else []
    picked += [r for r in ranked if r is not first][: max(n - len(picked), 0)]
    return picked
