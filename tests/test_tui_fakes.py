"""Shared helpers of the tests/test_tui_*.py files (no tests here): a scripted backend with a
fixed reply and fixed statistics, for deterministic snapshots, and Pilot waiting helpers."""
from __future__ import annotations

import asyncio
import threading
import time

from edgemoe.events import CacheStats, StepEvent
from edgemoe.inspect_model import ModelSummary
from edgemoe.tui.backends import ModelInfo
from edgemoe.tui.prompt import Vocab
from edgemoe.tui.stats import StatsSnapshot

MIB = 2**20
EXPERT_BYTES = 417_792  # one demo expert (q8_0, 256 x 512 x 3)


def fake_info(n_layers: int = 4, n_experts: int = 8, backend: str = "edgemoe", name: str = "demo") -> ModelInfo:
    summary = ModelSummary(path=f"{name}.gguf", arch="llama", name=name, n_layers=n_layers,
                           experts_per_layer=(n_experts,) * n_layers, experts_used=2,
                           type_counts={"F32": 13, "Q8_0": 30}, expert_bytes=n_layers * n_experts * EXPERT_BYTES,
                           dense_bytes=3 * MIB, stock_loadable=True, stock_reason="stock llama.cpp layout")
    return ModelInfo(summary, backend, 16 * MIB, 512, chat_template=False)


class ScriptedChat:
    """A backend that streams a fixed reply with fixed statistics (and can fail on cue)."""
    warnings: list[str] = []

    def __init__(self, reply: list[str], n_layers: int = 4, n_experts: int = 8, controls_cache: bool = True,
                 fail_after: int | None = None, delay_s: float = 0.0, reload_gate: threading.Event | None = None):
        # reload_gate: every budget change reloads (as budgeted llama.cpp leaving its default
        # layout) and takes until the gate is set
        self.reply, self.fail_after, self.delay_s, self.reload_gate = reply, fail_after, delay_s, reload_gate
        self.controls_cache = controls_cache
        self.name = "edgemoe" if controls_cache else "llama"
        self.policy, self.prefetch = ("lru", False) if controls_cache else ("-", False)
        self.info = fake_info(n_layers, n_experts, self.name)
        self.vocab = Vocab(lambda text, add_bos, special: [1] * add_bos + [2] * len(text.split()))
        self.expert_bytes_total = self.info.summary.expert_bytes
        self.budget_bytes = self.expert_bytes_total // 2
        self.prompts: list[list[int]] = []
        self.closed = False

    def _resident(self) -> tuple[tuple[int, int], ...]:
        n_layers = len(self.info.moe_layers)
        keep = self.budget_bytes // EXPERT_BYTES
        keys = [(layer, e) for e in range(self.info.n_experts) for layer in range(n_layers)]
        return tuple(sorted(keys[:keep]))

    def stream(self, ids, sampling):
        self.prompts.append(list(ids))
        for i, text in enumerate(self.reply[:sampling.max_tokens]):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("expert read failed: scripted failure")
            if self.delay_s:
                time.sleep(self.delay_s)
            n_layers = len(self.info.moe_layers)
            routing = tuple(((i + layer) % self.info.n_experts, (3 * i + layer + 1) % self.info.n_experts)
                            for layer in range(n_layers))
            cache = CacheStats(hits=2 * n_layers - 1, misses=1, bytes_read=EXPERT_BYTES, resident_bytes=len(
                self._resident()) * EXPERT_BYTES, budget_bytes=self.budget_bytes,
                resident_experts=self._resident()) if self.controls_cache else CacheStats()
            yield StepEvent(i, 100 + i, text, 0.1 * i, 10.0, cache, 300 * MIB, routing,
                            finished=i == len(self.reply) - 1)

    def set_budget(self, budget_bytes: int) -> CacheStats:
        if not self.controls_cache:
            raise ValueError("no cache")
        if budget_bytes < EXPERT_BYTES:
            raise ValueError("below the largest expert")
        if self.reload_gate is not None and not self.reload_gate.wait(timeout=30):
            raise ValueError("scripted reload never finished")
        self.budget_bytes = budget_bytes
        return self.residency()

    def budget_reloads(self, budget_bytes: int) -> bool:
        return self.reload_gate is not None

    def set_policy(self, name: str) -> None:
        self.policy = name

    def residency(self) -> CacheStats | None:
        if not self.controls_cache:
            return None
        resident = self._resident()
        return CacheStats(resident_bytes=len(resident) * EXPERT_BYTES, budget_bytes=self.budget_bytes,
                          resident_experts=resident)

    def close(self) -> None:
        self.closed = True


def fixed_stats(n_layers: int = 4, n_experts: int = 8, has_cache: bool = True) -> StatsSnapshot:
    """Statistics with every number fixed (no timings, no RSS readings): for snapshots."""
    total = n_layers * n_experts * EXPERT_BYTES
    resident = frozenset((layer, e) for layer in range(n_layers) for e in range(n_experts) if (layer + e) % 3)
    heat = tuple(tuple(((layer * 5 + e * 3) % 7) / 6 for e in range(n_experts)) for layer in range(n_layers))
    return StatsSnapshot(
        backend="edgemoe" if has_cache else "llama", has_cache=has_cache, tokens=42, session_tokens=96,
        tokens_per_s=12.5, hit_rate=0.75 if has_cache else None, session_hit_rate=0.81 if has_cache else None,
        layer_hit_rate=tuple(0.5 + 0.1 * (layer % 5) for layer in range(n_layers)) if has_cache else (),
        bytes_per_token=0.5 * MIB if has_cache else None, stall_s_per_token=0.004 if has_cache else None,
        prefetch_issued=40, prefetch_hits=30, prefetch_wasted=4, resident_bytes=len(resident) * EXPERT_BYTES,
        budget_bytes=total * 3 // 4, expert_bytes_total=total,
        peak_rss_bytes=300 * MIB, moe_layers=tuple(range(n_layers)), n_experts=n_experts,
        resident=resident if has_cache else frozenset(), heat=heat)


async def wait_until(pilot, condition, timeout_s: float = 30.0) -> None:
    # asyncio.sleep, not pilot.pause: that waits for an idle screen, which a streaming reply delays
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)


async def wait_reply(pilot, app, timeout_s: float = 40.0) -> None:
    """Until the reply in flight is done and every message it posted has been handled."""
    await wait_until(pilot, lambda: not app.chat.generating, timeout_s)
    await pilot.pause()
    await asyncio.sleep(0)


async def send(pilot, app, text: str) -> None:
    """Type `text` and submit it, returning as soon as the reply starts (pilot.press("enter")
    would return only once the screen is idle, i.e. after the whole reply)."""
    await wait_until(pilot, lambda: bool(app.chat.query("#prompt")))  # the screen may still be composing
    prompt = app.chat.query_one("#prompt")
    prompt.value = text
    await prompt.action_submit()
    await wait_until(pilot, lambda: app.chat.generating or not prompt.value)


def record_notifications(app, monkeypatch) -> list[str]:
    """Messages the app shows as toasts (app.notify), in order."""
    shown: list[str] = []
    original = app.notify
    monkeypatch.setattr(app, "notify", lambda message, *args, **kwargs: (shown.append(str(message)),
                                                                           original(message, *args, **kwargs))[1])
    return shown
