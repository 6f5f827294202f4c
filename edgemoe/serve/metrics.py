"""Server metrics folded from the backends' `StepEvent` stream, rendered in Prometheus' text
exposition format (version 0.0.4) for `GET /metrics`.

Counters only grow (a scraper derives rates: tokens/s = rate(edgemoe_generated_tokens_total));
gauges are the state at scrape time. Cache counters are the engine's own per-step counts
(`CacheStats`), summed; they are present only for a backend with an expert cache.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from edgemoe.events import CacheStats, StepEvent
from edgemoe.memory import current_rss_bytes, peak_rss_bytes

# CacheStats fields that are per-step counts (summed); the rest are states (resident, budget)
CACHE_COUNTS = ("hits", "misses", "evictions", "prefetch_issued", "prefetch_hits", "prefetch_wasted",
                "bytes_read", "stall_s", "low_served")


@dataclass
class Totals:
    """Sums over a stream of events: one request's, or the server's since it started."""
    generated_tokens: int = 0   # tokens the model produced (an end-of-sequence token is not one)
    prompt_tokens: int = 0
    kv_reused_tokens: int = 0   # prompt tokens whose K/V were kept from the previous request
    cache: Counter = field(default_factory=Counter)

    def add(self, event: StepEvent) -> None:
        if event.index == 0:
            self.prompt_tokens += event.prompt_tokens
            self.kv_reused_tokens += event.kv_reused_tokens
        if event.finish_reason != "stop":  # "stop" on an event: it carries the end-of-sequence token
            self.generated_tokens += 1
        c = event.cache
        self.cache.update({name: getattr(c, name) for name in CACHE_COUNTS})

    def cache_dict(self) -> dict[str, float]:
        return {name: self.cache[name] for name in CACHE_COUNTS}


_HELP = {
    "hits": "Expert lookups served by a resident expert.",
    "misses": "Expert lookups that had to load the expert (or serve its low-bit copy).",
    "evictions": "Experts evicted to stay within the budget.",
    "prefetch_issued": "Expert loads the prefetcher started.",
    "prefetch_hits": "Demand lookups served by an expert a prefetch brought in.",
    "prefetch_wasted": "Prefetched experts evicted before any use.",
    "bytes_read": "Expert bytes read from the model file.",
    "stall_s": "Seconds the compute path waited on expert loads.",
    "low_served": "Misses computed on a resident low-bit copy (dual precision).",
}
_UNIT = {"bytes_read": "edgemoe_expert_read_bytes_total", "stall_s": "edgemoe_expert_stall_seconds_total"}


@dataclass
class ServerState:
    """What the runner reports at scrape time."""
    generating: bool
    waiting: int
    queue_capacity: int
    residency: CacheStats | None  # the backend's resident set and budget now (None: no expert cache)


class Metrics:
    def __init__(self, model_id: str, backend: str, has_cache: bool):
        self.model_id, self.backend, self.has_cache = model_id, backend, has_cache
        self.totals = Totals()
        self.requests: Counter = Counter()   # (endpoint, outcome) -> count
        self.errors: Counter = Counter()     # HTTP status of refused/failed requests -> count
        self.ttft_s = [0.0, 0]                # sum, count: prefill until the first token
        self.queue_wait_s = [0.0, 0]
        self.decode_tps = 0.0                # the latest request's decode rate
        self._lock = threading.Lock()        # events arrive in the generation thread, scrapes in the server's

    def add(self, event: StepEvent) -> None:
        with self._lock:
            self.totals.add(event)
            if event.index == 0:
                self.ttft_s[0] += event.elapsed_s
                self.ttft_s[1] += 1
            elif event.tokens_per_s:
                self.decode_tps = event.tokens_per_s

    def request_done(self, endpoint: str, outcome: str, queue_wait_s: float | None = None) -> None:
        with self._lock:
            self.requests[endpoint, outcome] += 1
            if queue_wait_s is not None:
                self.queue_wait_s[0] += queue_wait_s
                self.queue_wait_s[1] += 1

    def error(self, status: int) -> None:
        with self._lock:
            self.errors[status] += 1

    def render(self, state: ServerState) -> str:
        with self._lock:
            return "".join(self._lines(state))

    def _lines(self, state: ServerState):
        def metric(name: str, kind: str, help_: str, samples) -> str:
            rows = samples if isinstance(samples, list) else [("", samples)]
            out = f"# HELP {name} {help_}\n# TYPE {name} {kind}\n"
            return out + "".join(f"{name}{labels} {_num(value)}\n" for labels, value in rows)

        t = self.totals
        yield metric("edgemoe_info", "gauge", "The loaded model and backend.",
                     [(_labels(model=self.model_id, backend=self.backend), 1)])
        yield metric("edgemoe_requests_total", "counter", "Generation requests by endpoint and outcome "
                     "(ok, cancelled: the client went away, error: the backend failed).",
                     [(_labels(endpoint=e, outcome=o), n) for (e, o), n in sorted(self.requests.items())])
        yield metric("edgemoe_http_errors_total", "counter", "Requests answered with an error object, by status.",
                     [(_labels(status=str(s)), n) for s, n in sorted(self.errors.items())])
        yield metric("edgemoe_generated_tokens_total", "counter", "Tokens generated.", t.generated_tokens)
        yield metric("edgemoe_prompt_tokens_total", "counter", "Prompt tokens of all requests.", t.prompt_tokens)
        yield metric("edgemoe_prompt_tokens_reused_total", "counter", "Prompt tokens whose K/V were kept from the "
                     "previous request (KV prefix reuse), so not prefilled.", t.kv_reused_tokens)
        yield metric("edgemoe_decode_tokens_per_second", "gauge", "Decode rate of the latest request (prefill "
                     "excluded).", self.decode_tps)
        yield _summary("edgemoe_time_to_first_token_seconds", "From the start of a generation to its first "
                       "token (the prefill; queue wait excluded).", self.ttft_s)
        yield _summary("edgemoe_queue_wait_seconds", "Time requests waited for the single generation stream.",
                       self.queue_wait_s)
        yield metric("edgemoe_generating", "gauge", "1 while a generation runs (one at a time).", int(state.generating))
        yield metric("edgemoe_queue_waiting", "gauge", "Requests waiting for the generation stream.", state.waiting)
        yield metric("edgemoe_queue_capacity", "gauge", "Requests that may wait (--queue); more are refused with "
                     "429.", state.queue_capacity)
        yield metric("edgemoe_peak_rss_bytes", "gauge", "Peak resident set size of the server process.",
                     peak_rss_bytes())
        yield metric("edgemoe_rss_bytes", "gauge", "Resident set size of the server process now.", current_rss_bytes())
        if self.has_cache:
            yield from self._cache_lines(metric, state.residency)

    def _cache_lines(self, metric, residency: CacheStats | None):
        c = self.totals.cache
        for name in CACHE_COUNTS:
            full = _UNIT.get(name, f"edgemoe_expert_{name}_total")
            yield metric(full, "counter", _HELP[name], c[name])
        looked_up = c["hits"] + c["misses"]
        yield metric("edgemoe_expert_hit_rate", "gauge", "hits / (hits + misses) since the server started.",
                     c["hits"] / looked_up if looked_up else 0.0)
        yield metric("edgemoe_prefetch_accuracy", "gauge", "prefetch hits / prefetches issued since the server "
                     "started.", c["prefetch_hits"] / c["prefetch_issued"] if c["prefetch_issued"] else 0.0)
        if residency is not None:
            yield metric("edgemoe_expert_resident_bytes", "gauge", "Expert bytes resident in the cache now.",
                         residency.resident_bytes)
            yield metric("edgemoe_expert_budget_bytes", "gauge", "The expert cache's byte budget.",
                         residency.budget_bytes)
            yield metric("edgemoe_expert_layer_resident_bytes", "gauge", "Expert bytes resident per layer now.",
                         [(_labels(layer=str(i)), b) for i, b in enumerate(residency.resident_bytes_per_layer)])


def _summary(name: str, help_: str, sum_count: list) -> str:
    return (f"# HELP {name} {help_}\n# TYPE {name} summary\n"
            f"{name}_sum {_num(sum_count[0])}\n{name}_count {sum_count[1]}\n")


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _num(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))

