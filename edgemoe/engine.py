"""The edgemoe engine: dense path in torch + ggml, experts from a byte-budgeted cache.

`Engine.stream_generate` yields one `StepEvent` per token; the CLI, TUI and benchmarks all
consume that stream and nothing else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from edgemoe.arch import model_class
from edgemoe.events import CacheStats, StepEvent
from edgemoe.arenas import arena_cache_class
from edgemoe.expert_store import find_experts
from edgemoe.errors import InputError
from edgemoe.gguf_file import GGUFFile
from edgemoe.legacy import check_current_layout
from edgemoe.memory import peak_rss_bytes
from edgemoe.model_check import check_model
from edgemoe.native.backend import CpuBackend
from edgemoe.policies import DEFAULT_POLICY, Key, make_policy
from edgemoe.predictor.base import DEFAULT_PREDICTOR
from edgemoe.text import split_complete_utf8
from edgemoe.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    budget_bytes: int | None = None  # None: room for every expert
    policy: str = DEFAULT_POLICY
    prefetch: bool = False
    n_threads: int | None = None
    n_ctx: int = 512
    seed: int = 0
    future: tuple[Key, ...] | None = None  # demand accesses to come, for the belady policy
    # dual precision (HOBBIT): a resident low-bit copy of every expert ("q2_k", "q3_k", ...), outside
    # budget_bytes. A miss whose largest gate weight is above dual_load_above loads the full copy
    # (and waits); any other miss is computed on the low copy (1.0: every miss; 0.0: none), and with
    # dual_background_load its full copy also loads behind. Defaults measured best on the demo and
    # the Mixtral-shaped slice (docs/BENCHMARKS.md); 0.5 suits top-2 routing.
    dual_low_type: str | None = None
    dual_load_above: float = 0.5
    dual_background_load: bool = False
    # what the prefetcher predicts with (prefetch=True): "cooccur" (cross-layer co-occurrence counted
    # online), "router" (next-layer router speculation, frequency prior for the next token), "prior",
    # "none", or "learned": the ONNX file at predictor_path (None: embedded in the GGUF or beside the
    # model, edgemoe.predictor.onnx_runtime)
    predictor: str = DEFAULT_PREDICTOR
    predictor_path: str | None = None
    # torch's intra-op threads, set process-wide when the engine opens (None: leave torch's setting).
    # torch runs only small per-token ops here (norms, rope, attention, routing); the big matmuls are
    # ggml's. With torch's default pool of one thread per core, each op waits on a spinning peer
    # whenever another process holds a core: on 2 cores the demo decoded 65-75 tok/s with 2 torch
    # threads vs 292 with 1 beside one busy process, and no slower with 1 when idle (docs/ENGINE.md).
    torch_threads: int | None = 1
    # the KV cache's type ("f16" as llama.cpp's default, "f32", "q8_0"), and the most prompt tokens one
    # forward step runs (a longer prompt is prefilled in chunks of this many)
    kv_type: str = "f16"
    n_batch: int = 512
    # dense matrices and expert arenas of types ggml multiplies faster repacked (Q4_0, Q4_K, IQ4_NL on
    # AVX2, ...; edgemoe/native/repack.py) are held repacked, as llama.cpp does by default; expert
    # arenas only when the budget holds every expert (below, each miss would repack again);
    # repack_experts True/False repacks expert arenas at any budget / never (repack must be on)
    repack: bool = True
    repack_experts: bool | None = None
    # with every expert resident, a decode step runs as one graph (edgemoe/token_graph.py);
    # False: layer by layer always (the same logits; tests and measurements compare the two)
    token_graph: bool = True
    # load every expert at open (None: when the budget holds them all, as llama.cpp loads its
    # weights; False: on first use, e.g. to measure what an open engine holds besides them)
    preload: bool | None = None


class Engine:
    def __init__(self, path: str | Path, config: EngineConfig = EngineConfig(),
                 on_progress: Callable[[int, int], None] | None = None):
        """`on_progress(done, total)`: expert bytes read while a budget that holds every expert
        loads them at open (the CLI's progress bar); not called otherwise."""
        self.path, self.config, self._on_progress = Path(path), config, on_progress
        self.backend = self.cache = self.prefetcher = None  # what close() frees, once made
        try:
            self._open(config)
        except BaseException:  # a bad tokenizer or predictor file: free the fd, backend and loader thread
            self.close()
            raise

    def _open(self, config: EngineConfig) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.file = GGUFFile(self.path)
        check_current_layout(self.file)  # first: an old per-expert file gets what it is and the fix
        check_model(self.file)  # every dense tensor's shape against the file's hyper-parameters
        cls = model_class(self.file.arch)
        self.backend = CpuBackend(config.n_threads)
        self.specs = find_experts(self.file)
        n_layers = int(self.file.arch_field("block_count"))
        total = sum(s.alloc_bytes for s in self.specs.values())
        budget = config.budget_bytes if config.budget_bytes is not None else total
        policy = make_policy(config.policy, list(config.future) if config.future else None, config.seed)
        low = None
        if config.dual_low_type:
            from edgemoe.dual import LowCopies, parse_low_type
            low = LowCopies(self.path, self.specs, parse_low_type(config.dual_low_type), self.backend.n_threads)
        # a background full-precision load requested more than ~2 tokens' worth of accesses ago is dropped
        stale = 2 * len({layer for layer, _ in self.specs}) * int(self.file.arch_field("expert_used_count", 1))
        # expert arenas are repacked only when every expert fits: each is then repacked once, while
        # under a smaller budget every miss would pay the repack (single-threaded, slower than the
        # read: Mixtral slice at a 2.4 GiB budget decoded 0.60 tok/s repacked vs 1.09 plain)
        repack_experts = config.repack and (budget >= total if config.repack_experts is None else config.repack_experts)
        self.cache = arena_cache_class()(self.path, self.specs, budget, policy, n_layers, low, config.dual_load_above,
                                         stale, config.dual_background_load, repack_layouts=repack_experts)
        if low is None and self.cache.state.holds_everything() and config.preload is not False:
            # every expert fits: all loaded now, as llama.cpp loads its weights; decode then runs a
            # token as one graph (edgemoe/token_graph.py)
            self.cache.preload_all(self._on_progress)
        self.model = cls(self.file, self.backend, self.cache, kv_type=config.kv_type, n_batch=config.n_batch,
                         repack=config.repack, token_graph=config.token_graph)
        self.tokenizer = Tokenizer(self.path)
        self.prefetcher = None
        self.warnings: list[str] = []  # what the engine worked around (an unusable predictor file)
        if config.prefetch:
            from edgemoe.predictor.select import engine_predictor
            from edgemoe.prefetch import Prefetcher
            predictor, self.warnings = engine_predictor(self, config.predictor, config.predictor_path)
            self.prefetcher = Prefetcher(self.model, self.cache, predictor)
        # the generation KV cache, kept between calls, and the tokens whose K/V it holds at
        # positions 0..len-1 (stream_generate's reuse_kv continues from their common prefix)
        self._kv = None
        self._kv_ids: list[int] = []

    @property
    def expert_bytes_total(self) -> int:
        return sum(s.alloc_bytes for s in self.specs.values())

    @property
    def low_bytes(self) -> int:
        """Memory of the dual-precision low-bit copies (0 without them), outside the budget."""
        return self.cache.low.nbytes if self.cache.low else 0

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of `tokens`, from a fresh KV cache: [T, V]."""
        kv = self.model.new_kv(max(len(tokens), 1), self.config.n_batch)
        try:
            self.cache.check_file()  # dense weights are mapped from the file: never touch a truncated one
            return self.model.forward(tokens, kv, 0, all_logits=True).numpy()
        finally:
            kv.close()

    def stream_generate(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, stop_at_eos: bool = True, *, seed: int | None = None,
                        reuse_kv: bool = False) -> Iterator[StepEvent]:
        """One event per generated token. Event i carries the cache statistics of the forward
        pass whose logits chose token i (event 0: the prompt's prefill).

        `reuse_kv`: keep the K/V of the longest common prefix of this prompt and the tokens the
        previous generation left in the KV cache (n_past = that length), and prefill only the
        rest (a chat turn or a request that extends the last one). Off by default: measuring
        tools (bench, tune, trace) want every prompt prefilled whole. `seed`: this call's
        sampling seed (default: the config's)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + max_tokens > self.config.n_ctx:
            raise InputError(f"prompt ({len(ids)} tokens) + {max_tokens} new tokens exceed the context "
                             f"of {self.config.n_ctx}; raise --ctx or shorten the prompt")
        if self._kv is None:
            self._kv = self.model.new_kv(self.config.n_ctx, self.config.n_batch)
        kv = self._kv
        # at least the last prompt token is forwarded: its logits choose the first new token
        n_past = max(min(common_prefix(self._kv_ids, ids), len(ids) - 1), 0) if reuse_kv else 0
        self._kv_ids = ids[:n_past]  # positions >= n_past are overwritten from here on
        rng = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        start = time.perf_counter()
        pending, history = b"", list(ids)
        first_token_s = None
        with torch.no_grad():
            self.cache.check_file()  # dense weights are mapped from the file: never touch a truncated one
            logits = self.model.forward(ids[n_past:], kv, n_past)[-1]
            self._kv_ids = list(ids)
            for i in range(max_tokens):
                if i > 0:
                    self.cache.check_file()
                    logits = self.model.forward([history[-1]], kv, len(history) - 1)[-1]
                    self._kv_ids.append(history[-1])
                token = sample(logits, temperature, top_p, rng)
                now = time.perf_counter()
                first_token_s = first_token_s if first_token_s is not None else now
                eos = stop_at_eos and token == self.tokenizer.eos
                finish = "stop" if eos else "length" if i == max_tokens - 1 else ""
                text = ""
                if not eos:
                    pending += self.tokenizer.decode_bytes([token], prev=history)
                    text, pending = split_complete_utf8(pending)
                history.append(token)
                # decode speed excludes the prefill: tokens after the first over the time since it
                tps = i / (now - first_token_s) if i > 0 and now > first_token_s else 0.0
                yield self._event(i, token, text, now - start, tps, finish, len(ids), n_past)
                if finish:
                    return

    def _event(self, index: int, token: int, text: str, elapsed_s: float, tps: float, finish: str,
               prompt_tokens: int, kv_reused_tokens: int) -> StepEvent:
        routing = tuple(tuple(b.last_ids[-1].tolist()) if b.last_ids is not None else () for b in self.model.moe_blocks)
        return StepEvent(index, token, text, elapsed_s, tps, self.cache.step_stats(), peak_rss_bytes(), routing,
                         bool(finish), finish, prompt_tokens, kv_reused_tokens)

    def residency(self) -> CacheStats:
        """Resident set and budget now, leaving the step counters to the next event: a live view
        shows the effect of `cache.set_budget` at once, without waiting for a token."""
        with self.cache.cond:
            keys = tuple(sorted(self.cache.resident))
            budget = self.cache.budget_bytes
        per_layer = [0] * self.cache.n_layers
        for key in keys:
            per_layer[key[0]] += self.specs[key].alloc_bytes
        return CacheStats(resident_bytes=sum(per_layer), budget_bytes=budget,
                          resident_bytes_per_layer=tuple(per_layer), resident_experts=keys)

    def close(self) -> None:
        if getattr(self, "_kv", None) is not None:
            self._kv.close()
        self._kv, self._kv_ids = None, []
        # after a failed open: those made
        for part in (self.prefetcher, getattr(self, "model", None), self.cache, self.backend):
            if part is not None:
                part.close()


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def sample(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator) -> int:
    if temperature <= 0:
        # numpy's argmax: the same first maximum as torch.argmax, 7 vs 91 us over a 151,936-token
        # vocabulary (a Qwen3 decode token is ~20 ms)
        return int(np.argmax(logits.numpy() if isinstance(logits, torch.Tensor) else logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=rng))
