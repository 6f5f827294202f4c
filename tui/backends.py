"""What the chat runs on: the edgemoe engine or stock llama.cpp, behind one small interface.

Both turn prompt ids into a stream of `StepEvent`s (the engine's own event type); the chat never
sees more of the engine than that stream and the two cache controls.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgemoe.errors import InputError
from edgemoe.events import CacheStats, StepEvent
from edgemoe.gguf_file import GGUFFile
from edgemoe.inspect_model import ModelSummary, summarize
from edgemoe.policies import ONLINE_POLICIES
from edgemoe.tui.prompt import Sampling, Vocab

LIVE_POLICIES = ONLINE_POLICIES  # belady needs a recorded future: not switchable live
CLOSE_WAIT_S = 60.0  # how long closing waits for a token in flight (a big model's token can take seconds)


@dataclass(frozen=True)
class ModelInfo:
    summary: ModelSummary
    backend: str
    file_bytes: int
    n_ctx: int
    chat_template: bool

    @property
    def title(self) -> str:
        s = self.summary
        return s.name or Path(s.path).stem

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Layer numbers that have experts (routing tuples are indexed by these, in order)."""
        return tuple(i for i, n in enumerate(self.summary.experts_per_layer) if n)

    @property
    def n_experts(self) -> int:
        return max(self.summary.experts_per_layer, default=0)


def read_info(path: Path, backend: str, n_ctx: int) -> tuple[ModelInfo, GGUFFile]:
    model = GGUFFile(path)
    info = ModelInfo(summarize(model), backend, model.size, n_ctx,
                     bool(model.field("tokenizer.chat_template")))
    return info, model


def vocab_of(model: GGUFFile, encode) -> Vocab:
    """Special-token texts and the chat template from the GGUF's tokenizer metadata."""
    template = model.field("tokenizer.chat_template")
    if not template:
        return Vocab(encode)
    tokens = model.field("tokenizer.ggml.tokens") or []

    def text(key: str) -> str:
        i = model.field(key)
        return str(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else ""

    return Vocab(encode, text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"), str(template))


class _OneStream:
    """One stream at a time; `close` waits for the stream in flight (never free the model under a
    running forward pass) and then calls `_release`."""

    def __init__(self):
        self._busy = threading.Lock()

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._busy.acquire(timeout=CLOSE_WAIT_S):
            try:
                self._release()
            finally:
                self._busy.release()


class EngineChat(_OneStream):
    """The edgemoe engine: budgeted expert cache, live budget and policy changes.

    `reuse_kv`: a prompt that extends the last one (the next chat turn, a request continuing the
    previous) prefills only its new tokens; off, every prompt is prefilled whole."""
    name = "edgemoe"
    controls_cache = True

    def __init__(self, engine, reuse_kv: bool = True):
        super().__init__()
        self.engine, self.reuse_kv = engine, reuse_kv
        self.warnings = list(getattr(engine, "warnings", ()))  # what the engine worked around at start
        self.info, model = read_info(engine.path, self.name, engine.config.n_ctx)
        self.vocab = vocab_of(model, lambda text, add_bos, special: engine.tokenizer.encode(text, add_bos, special))
        self.policy, self.prefetch = engine.config.policy, engine.config.prefetch
        self.expert_bytes_total = engine.expert_bytes_total
        self.seed = engine.config.seed

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[StepEvent]:
        with self._busy:
            yield from self.engine.stream_generate(ids, sampling.max_tokens, sampling.temperature, sampling.top_p,
                                                   seed=sampling.seed, reuse_kv=self.reuse_kv)

    def set_budget(self, budget_bytes: int) -> CacheStats:
        self.engine.cache.set_budget(budget_bytes)
        return self.engine.residency()

    def budget_reloads(self, budget_bytes: int) -> bool:
        return False  # the engine resizes its cache in place

    def set_policy(self, name: str) -> None:
        from edgemoe.policies import make_policy

        self.engine.cache.set_policy(make_policy(live_policy(name), seed=self.seed))
        self.policy = name

    def residency(self) -> CacheStats:
        return self.engine.residency()

    def _release(self) -> None:
        self.engine.close()


def live_policy(name: str) -> str:
    if name not in LIVE_POLICIES:
        raise InputError(f"policy {name!r} cannot be switched to live; choose one of {', '.join(LIVE_POLICIES)}")
    return name


class LlamaChat(_OneStream):
    """llama.cpp computes. Stock (no `runtime`): every expert stays mapped, so there is no
    budget or policy to change; routing comes from llama.cpp's graph through RoutingTap.
    Budgeted (`runtime`, edgemoe/llama_budget.py): edgemoe's cache decides which experts are
    resident, and budget and policy change live as on the engine."""
    name = "llama"
    controls_cache = False
    policy, prefetch = "-", False

    warnings: list[str] = []

    def __init__(self, path: Path, n_ctx: int = 512, seed: int = 0, n_threads: int | None = None,
                 reuse_kv: bool = True, runtime=None, on_progress=None):
        from edgemoe.llama_backend import RoutingTap, open_llama

        super().__init__()
        self.reuse_kv, self.seed, self.runtime = reuse_kv, seed, runtime
        self.info, model = read_info(path, self.name, n_ctx)
        if runtime is None:
            self._tap = RoutingTap(int(model.arch_field("expert_used_count", 1)),
                                   int(model.arch_field("expert_count", 1)))
            self._llm = open_llama(path, n_ctx=n_ctx, seed=seed, routing=self._tap, n_threads=n_threads,
                                   on_progress=on_progress)
        else:
            self.warnings = list(runtime.warnings)
            self.controls_cache, self.policy, self.prefetch = True, runtime.config.policy, runtime.config.prefetch
        self.vocab = vocab_of(model, lambda text, add_bos, special: self.llm.tokenize(
            text.encode("utf-8"), add_bos=add_bos, special=special))
        self.expert_bytes_total = self.info.summary.expert_bytes

    # the runtime's own: a live budget change may reopen its model (edgemoe/llama_full.py)
    @property
    def llm(self):
        return self.runtime.llm if self.runtime else self._llm

    @property
    def tap(self):
        return self.runtime.tap if self.runtime else self._tap

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[StepEvent]:
        from edgemoe.llama_backend import stream_generate

        with self._busy:
            if not self.reuse_kv:
                self.llm.reset()  # forget the evaluated tokens: the whole prompt is prefilled
            seed = self.seed if sampling.seed is None else sampling.seed
            args = (ids, sampling.max_tokens, sampling.temperature)
            events = (self.runtime.stream_generate(*args, top_p=sampling.top_p, seed=seed) if self.runtime else
                      stream_generate(self.llm, *args, self.tap, top_p=sampling.top_p, seed=seed))
            for event in events:
                self.tap.steps.clear()  # keep only the latest step: a long chat must not grow this
                yield event

    def set_budget(self, budget_bytes: int) -> CacheStats:
        if self.runtime is None:
            raise InputError("stock llama.cpp keeps every expert mapped; start with --budget to give it a budget")
        self.runtime.set_budget(budget_bytes)
        return self.runtime.residency()

    def budget_reloads(self, budget_bytes: int) -> bool:
        """Whether set_budget reloads the model (the budgeted mode leaving llama.cpp's default layout)."""
        return self.runtime is not None and self.runtime.reloads_for(budget_bytes)

    def set_policy(self, name: str) -> None:
        if self.runtime is None:
            raise InputError("stock llama.cpp has no expert cache; start with --budget to give it one")
        self.runtime.set_policy(live_policy(name))
        self.policy = name

    def residency(self) -> CacheStats | None:
        return self.runtime.residency() if self.runtime else None

    def _release(self) -> None:
        (self.runtime or self.llm).close()


def open_backend(path: Path, backend: str, config, reuse_kv: bool = True,
                 gpu_layers: int = 0, on_progress=None) -> EngineChat | LlamaChat:
    """`config`: an EngineConfig (the llama backend uses its n_ctx, seed and n_threads, and with a
    budget also its policy and prefetch settings: llama.cpp computes, our cache decides).
    `reuse_kv`: prefill only what a prompt adds to the last one (see EngineChat).
    `gpu_layers`: llama backend only, dense layers on the GPU (GPU builds of llama.cpp).
    `on_progress(done, total)`: bytes loaded at open, the engine's experts (Engine's) or llama.cpp's
    file (open_llama's)."""
    if backend == "llama":
        runtime = None
        if config.budget_bytes is not None or gpu_layers:
            from edgemoe.llama_budget import BudgetedLlama, budgeted_config

            runtime = BudgetedLlama(path, budgeted_config(config, gpu_layers), on_progress)
            runtime.observe_routing = True  # the chat's routing heatmap reads every step's
        return LlamaChat(path, config.n_ctx, config.seed, config.n_threads, reuse_kv, runtime, on_progress)
    from edgemoe.engine import Engine

    return EngineChat(Engine(path, config, on_progress), reuse_kv)
