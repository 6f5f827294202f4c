"""The one event stream that the CLI, the TUI and the benchmarks all consume."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheStats:
    """Expert-cache counters for one step (a prefill or one decoded token)."""
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0      # demand accesses served by an expert a prefetch brought in
    prefetch_wasted: int = 0    # prefetched experts evicted before any use
    bytes_read: int = 0
    stall_s: float = 0.0        # time the compute path waited on expert loads
    resident_bytes: int = 0
    budget_bytes: int = 0
    resident_bytes_per_layer: tuple[int, ...] = ()
    resident_experts: tuple[tuple[int, int], ...] = ()  # (layer, expert) pairs resident after the step
    # dual precision (EngineConfig.dual_low_type): misses served by an expert's resident low-bit copy
    low_served: int = 0          # expert accesses computed on the low-bit copy (counted in misses too)
    low_token_slots: int = 0     # token x chosen-expert pairs computed on a low-bit copy
    token_slots: int = 0         # all token x chosen-expert pairs of the step
    low_resident_bytes: int = 0  # the low-bit copies' memory, outside budget_bytes (0 without dual precision)

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def low_share(self) -> float:
        """Share of token x expert pairs served at low precision."""
        return self.low_token_slots / self.token_slots if self.token_slots else 0.0


@dataclass(frozen=True)
class StepEvent:
    """One generated token; `tokens_per_s` is the decode rate so far (prefill excluded)."""
    index: int
    token: int
    text: str
    elapsed_s: float
    tokens_per_s: float
    cache: CacheStats = field(default_factory=CacheStats)
    peak_rss_bytes: int = 0
    routing: tuple[tuple[int, ...], ...] = ()  # per layer: experts chosen for this step's last token
    finished: bool = False
    finish_reason: str = ""      # on the last event: "stop" (end-of-sequence token) or "length" (max tokens)
    prompt_tokens: int = 0       # tokens in this generation's prompt
    kv_reused_tokens: int = 0    # of those, tokens whose K/V were kept from the previous generation (not prefilled)
