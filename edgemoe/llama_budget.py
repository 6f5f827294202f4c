"""Budgeted llama.cpp: llama.cpp computes every kernel on the stock GGUF file, edgemoe decides
which experts are resident (`--backend llama --budget X`).

llama.cpp loads the file with mmap and without the CPU repack buffers, so its weights are the
file's pages in its own mapping. After load the expert pages are dropped (RssFile falls to the
dense weights). llama.cpp's eval callback, asked for `ffn_moe_topk-<layer>`, runs after a
layer's routing and before its expert matmuls: there the layer's chosen experts go through the
engine's `ExpertCache` (same Residency, policies, counters) whose misses are read with O_DIRECT
into reused slots and moved into llama.cpp's mapping (edgemoe/llama_slots.py); evictions move
the slots out and map the file back. The prefetcher loads the next layer's predicted experts in
the background within the budget: router speculation reads `ffn_norm-<layer>` (the MoE input)
from the same callback and applies the next layer's router to it.

That is the slots layout. At a budget that holds every expert there is nothing to decide, and
llama.cpp loads the file with its own defaults instead (CPU repack on: edgemoe/llama_full.py);
a budget lowered live below that reopens the model in the slots layout.

    rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=2 << 30, policy="split", prefetch=True))
    for event in rt.stream_generate("def f(x):", 32): ...   # StepEvents with CacheStats
    rt.close()
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

from edgemoe.errors import InputError
from edgemoe.events import CacheStats, StepEvent
from edgemoe.expert_cache import ExpertCache
from edgemoe.expert_loader import ExpertLoader
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.llama_backend import AttachedThreadpool, RoutingTap, open_llama, stream_generate
from edgemoe.llama_full import LoadedExpertCache, default_layout
from edgemoe.llama_load import LlamaApiMissing, check_api, find_llama_mapping, load_params  # noqa: F401 (re-exported)
from edgemoe.llama_pages import PAGE, file_mappings, mapping_rss_bytes, probe_dontunmap, resident_pages
from edgemoe.llama_slots import ExpertPages, MappedExperts, expert_pages, expert_runs, page_runs
from edgemoe.policies import DEFAULT_POLICY, Key, make_policy
from edgemoe.predictor.base import DEFAULT_PREDICTOR
from edgemoe.residency import BudgetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetedConfig:
    budget_bytes: int
    policy: str = DEFAULT_POLICY
    prefetch: bool = False
    predictor: str = DEFAULT_PREDICTOR  # none | router | prior | cooccur | learned (see edgemoe/predictor)
    predictor_path: str | None = None  # the learned predictor's .onnx
    n_ctx: int = 512
    seed: int = 0
    n_threads: int | None = None
    f32_kv: bool = False
    gpu_layers: int = 0                # dense layers on the GPU, experts kept in RAM (GPU builds only)
    expert_overrides: bool | None = None  # expert tensors pinned to CPU memory (default: when gpu_layers)
    future: tuple[Key, ...] | None = None  # the belady policy's future accesses
    full_layout: bool | None = None    # llama.cpp's default layout: None = when the budget holds every expert


def budgeted_config(config, gpu_layers: int = 0) -> BudgetedConfig:
    """The budgeted mode's settings from an EngineConfig (what generate/chat/serve build)."""
    if config.budget_bytes is None:
        raise InputError("the budgeted llama mode needs an expert budget (--budget or --max-memory)")
    if config.dual_low_type:
        raise InputError("--dual-low needs --backend edgemoe: stock llama.cpp runs one precision per expert tensor")
    return BudgetedConfig(budget_bytes=config.budget_bytes, policy=config.policy, prefetch=config.prefetch,
                          predictor=config.predictor, predictor_path=config.predictor_path, n_ctx=config.n_ctx,
                          seed=config.seed, n_threads=config.n_threads, gpu_layers=gpu_layers, future=config.future)


def file_geometry(model: GGUFFile) -> tuple[dict, list[tuple[int, int]], dict[Key, ExpertPages]]:
    """(expert specs, dense byte ranges, page geometry) of a stock file. Dense: every other tensor
    and the header before the first one (pages sharing bytes with them are never dropped)."""
    specs = stock_experts(model)
    if not specs:
        raise ModelFileError(f"{model.path} has no routed experts; run it without --budget")
    dense = [(t.offset, t.nbytes) for t in model.tensors.values() if not t.is_expert]
    dense.append((0, min(t.offset for t in model.tensors.values())))
    return specs, dense, expert_pages(specs, dense)


def _smallest(geometry: dict[Key, ExpertPages], top_k: int) -> int:
    """A decode step needs one layer's top-k experts resident at once."""
    return top_k * max(g.charge_bytes for g in geometry.values())


def _every_expert(geometry: dict[Key, ExpertPages]) -> int:
    """The budget that holds every expert (what the budget counts per expert, summed)."""
    return sum(g.charge_bytes for g in geometry.values())


def budget_range(path) -> tuple[int, int]:
    """(smallest, full) expert budget of the budgeted mode on `path`, as llama.cpp maps experts."""
    model = GGUFFile(path)
    geometry = file_geometry(model)[2]
    return _smallest(geometry, int(model.arch_field("expert_used_count", 1))), _every_expert(geometry)


class MappedExpertCache(ExpertCache):
    """The engine's ExpertCache whose resident copies live in llama.cpp's mapping."""

    def __init__(self, path, specs, pages: MappedExperts, budget_bytes: int, policy, n_layers: int):
        self.pages = pages
        super().__init__(path, specs, budget_bytes, policy, n_layers, loader=pages.loader,
                         sizes={k: g.charge_bytes for k, g in pages.geometry.items()})

    def _load(self, keys: list[Key]):
        return self.pages.place(keys)

    def stream(self, keys: list[Key], n_slots: list[int]) -> None:
        """Accesses by `n_slots` tokens each, served from the file this once (no room beside the
        layer's other experts)."""
        with self.cond:
            for key, n in zip(keys, n_slots):
                self.state.touch(key, n)
                self.state.c.misses += 1
                self.state.c.bytes_read += sum(n for _, n in self.pages.geometry[key].interiors)
        self.pages.stream(keys)

    def set_budget(self, budget_bytes: int) -> None:
        super().set_budget(budget_bytes)
        self.pages.set_pool_limit(budget_bytes)


class _Tap(RoutingTap):
    """RoutingTap that also hands each layer's routing (and MoE input) to the runtime. An error
    stops the graph (the callback returns False) and is raised after the step."""
    NORM = b"ffn_norm-"

    def __init__(self, runtime: "BudgetedLlama", top_k: int, n_expert: int, n_embd: int, want_inputs: bool):
        super().__init__(top_k, n_expert)
        self.runtime, self.n_embd, self.want_inputs = runtime, n_embd, want_inputs
        self.error: BaseException | None = None
        # False (llama.cpp's default layout, nobody showing routing): a one-token layer step is not
        # stopped for. Each asked-for node splits llama.cpp's graph: 17 computes instead of one per
        # Qwen3-slice token, ~10% of its decode. Its accesses are still exact: the token's top-k
        # experts, distinct and all resident, so top_k hits (`unseen` counts such layer steps).
        self.routing_wanted = True
        self.unseen = 0
        self.seen = False  # this step read some layer's routing

    @staticmethod
    def _layer(name: bytes, prefix: bytes) -> int | None:
        """`prefix<layer>` exactly (views are named "ffn_norm-0 (reshaped)" and the like)."""
        tail = name[len(prefix):]
        return int(tail) if name.startswith(prefix) and tail.isdigit() else None

    def _on_tensor(self, tensor, ask, user_data) -> bool:
        try:
            name = self.lib.ggml_get_name(tensor) or b""
            if ask:  # llama.cpp asks about every graph node (~1,100 a token on the Qwen3 slice): stay cheap
                if name.startswith(self.PREFIX):
                    if not name[len(self.PREFIX):].isdigit():
                        return False
                    # a prompt's step: its first layer has many rows, and its last (llama.cpp computes
                    # only the last token there) is read because the step's earlier ones were
                    if self.routing_wanted or self.seen or self.lib.ggml_nelements(tensor) > self.top_k:
                        return True
                    self.unseen += 1
                    return False
                return self.want_inputs and name.startswith(self.NORM) and name[len(self.NORM):].isdigit()
            routed, moe_input = self._layer(name, self.PREFIX), self._layer(name, self.NORM)
            if self.error is not None or not self.runtime.ready:
                return self.error is None
            if routed is not None:
                self.seen = True
                super()._on_tensor(tensor, ask, user_data)
                self.runtime.on_routed(routed, self._current[routed])
            elif moe_input is not None:
                self.runtime.on_moe_input(moe_input, self._last_row(tensor))
            return True
        except BaseException as exc:  # never unwind through llama.cpp's C frames
            self.error = exc
            return False

    def _last_row(self, tensor):
        import torch

        n_tokens = self.lib.ggml_nelements(tensor) // self.n_embd
        row = torch.empty(1, self.n_embd, dtype=torch.float32)
        self.lib.ggml_backend_tensor_get(tensor, ctypes.c_void_p(row.data_ptr()),
                                         (n_tokens - 1) * self.n_embd * 4, self.n_embd * 4)
        return row


class BudgetedLlama:
    def __init__(self, path: str | os.PathLike, config: BudgetedConfig,
                 on_progress: Callable[[int, int], None] | None = None):
        """`on_progress(done, total)`: llama.cpp's load of the file (open_llama's), at open and at
        a reload in the slots layout."""
        check_api(config.gpu_layers)
        probe_dontunmap()
        self.path, self.config, self._on_progress = Path(path), config, on_progress
        self.file = GGUFFile(self.path)
        self.specs, self.dense_ranges, self.geometry = file_geometry(self.file)
        self.top_k = int(self.file.arch_field("expert_used_count", 1))
        self.n_expert = int(self.file.arch_field("expert_count", 1))
        self._check_budget(config.budget_bytes)
        self.full_bytes, self.ready = _every_expert(self.geometry), False
        self.moe_layers = sorted({k[0] for k in self.specs})
        self.n_layers = int(self.file.arch_field("block_count", 0))
        self.llm = self.threads = self.pages = self.cache = self.prefetcher = self.tap = None
        self.layout = ""  # "default": llama.cpp's own load, every expert resident; "slots": budgeted
        self.warnings: list[str] = []
        self._pinned: list[Key] = []
        self._streamed: list[Key] = []
        # a reopen (set_budget) never runs under a reply, and close() waits for one in progress
        # (re-entrant: the reopen closes the old load itself)
        self._lock = threading.RLock()
        self._streaming = False
        self._observe_routing = False
        self._open(default_layout(config.full_layout, config.budget_bytes, self.full_bytes), config.budget_bytes)

    @property
    def observe_routing(self) -> bool:
        """Every step's routing in its StepEvent (the chat's heatmap). Off, llama.cpp's default
        layout reads only prompt steps' routing (decode events carry none; their counts stay exact)."""
        return self._observe_routing

    @observe_routing.setter
    def observe_routing(self, on: bool) -> None:
        self._observe_routing = on
        if self.tap is not None:
            self.tap.routing_wanted = on or self.layout != "default"

    def _check_budget(self, budget_bytes: int) -> None:
        need = _smallest(self.geometry, self.top_k)
        if budget_bytes < need:
            raise BudgetError(f"expert budget {budget_bytes / 2**20:.2f} MiB is below one layer's {self.top_k} chosen "
                              f"experts ({need / 2**20:.2f} MiB as llama.cpp maps them); raise --budget to at least that")

    def _open(self, default: bool, budget_bytes: int) -> None:
        """Load the model in the default or the slots layout; on failure nothing stays open."""
        try:
            self._load(default, budget_bytes)
        except BaseException:
            self.close()
            raise

    def _load(self, default: bool, budget_bytes: int) -> None:
        c = self.config
        overrides = c.expert_overrides if c.expert_overrides is not None else c.gpu_layers > 0
        model_params, context_params, keep = load_params(c.gpu_layers, overrides, default)
        # the default layout holds every expert: a prefetch would have nothing to load, so none runs
        predictor = self._predictor() if c.prefetch and not default else None
        want_inputs = bool(predictor is not None and predictor.needs_logits)
        self.tap = _Tap(self, self.top_k, self.n_expert, int(self.file.arch_field("embedding_length")), want_inputs)
        self.tap.routing_wanted = not default or self._observe_routing
        before = file_mappings(self.path)
        self.llm = open_llama(self.path, n_ctx=c.n_ctx, seed=c.seed, f32_kv=c.f32_kv, routing=self.tap,
                              n_threads=c.n_threads, model_params=model_params, context_params=context_params,
                              on_progress=self._on_progress)
        del keep  # llama.cpp copied the override list while loading
        self.threads = AttachedThreadpool(self.llm)
        policy = make_policy(c.policy, list(c.future) if c.future else None, seed=c.seed)
        self.layout = "default" if default else "slots"
        if default:
            sizes = {k: g.charge_bytes for k, g in self.geometry.items()}
            self.cache = LoadedExpertCache(self.path, self.specs, sizes, budget_bytes, policy, self.n_layers)
        else:
            mapping = find_llama_mapping(self.path, before, expert_runs(self.geometry))
            self.pages = MappedExperts(self.path, mapping, self.geometry, ExpertLoader(self.path), budget_bytes)
            self.pages.drop_all(page_runs(self.dense_ranges),
                                [m for m in file_mappings(self.path) if not mapping.start <= m.start < mapping.end])
            self.cache = MappedExpertCache(self.path, self.specs, self.pages, budget_bytes, policy, self.n_layers)
        if predictor is not None:
            from edgemoe.prefetch import Prefetcher

            self.prefetcher = Prefetcher(SimpleNamespace(moe_blocks=self.blocks), self.cache, predictor)
        self.tap.steps.clear()
        self.ready = True

    def _predictor(self):
        from edgemoe.layers import tensor_f32
        from edgemoe.predictor.select import engine_predictor

        self.blocks = [SimpleNamespace(layer=l, router=tensor_f32(self.file, f"blk.{l}.ffn_gate_inp.weight"),
                                       cfg=SimpleNamespace(top_k=self.top_k), observers=[], recorders=[])
                       for l in self.moe_layers]
        self.block_of = {b.layer: b for b in self.blocks}
        shim = SimpleNamespace(path=self.path, file=self.file, model=SimpleNamespace(moe_blocks=self.blocks))
        predictor, warnings = engine_predictor(shim, self.config.predictor, self.config.predictor_path)
        self.warnings += warnings
        return predictor

    # ---- the eval callback's side ---------------------------------------------------------
    def on_moe_input(self, layer: int, x) -> None:
        block = self.block_of.get(layer)  # leading dense layers (deepseek2) have an ffn_norm too
        if self.prefetcher is not None and block is not None:
            for observe in block.observers:
                observe(layer, x)

    def on_routed(self, layer: int, ids: list[list[int]]) -> None:
        """Layer `layer` routed its tokens to ids [T, k]: its experts must be in place before
        this returns; the previous layer's are done, so they are released."""
        self._finish_layer()
        slots = Counter((layer, e) for row in ids for e in row)  # the tokens routed to each expert
        keys = sorted(slots)
        if self.pages is None:  # the default layout: every expert is in llama.cpp's own buffers
            self.cache.route(keys, [slots[k] for k in keys])
            return
        if self.prefetcher is not None:  # a wrong guess for this layer must not hold up its demand reads
            self.cache.cancel_prefetches(layer, set(keys))
        fit, rest = self._split(keys)
        if fit:
            self.cache.acquire_many(fit, [slots[k] for k in fit])
            self._pinned = fit
        if rest:
            self.cache.stream(rest, [slots[k] for k in rest])
            self._streamed = rest
        if self.prefetcher is not None:
            import torch

            for record in self.block_of[layer].recorders:
                record(layer, torch.tensor(ids))

    def _split(self, keys: list[Key]) -> tuple[list[Key], list[Key]]:
        """All of `keys` if they fit the budget together (a prompt's many tokens may choose more);
        else the resident ones and as many misses as fit, the rest computed from the file."""
        sizes, budget = self.cache.state.sizes, self.cache.budget_bytes
        if sum(sizes[k] for k in keys) <= budget:
            return keys, []
        resident = self.cache.state.resident
        fit, used = [], 0
        for k in sorted(keys, key=lambda k: k not in resident):
            if used + sizes[k] <= budget:
                fit.append(k)
                used += sizes[k]
        return sorted(fit), [k for k in keys if k not in fit]

    def _finish_layer(self) -> None:
        for key in self._pinned:
            self.cache.release(key)
        self._pinned = []
        if self._streamed:
            self.pages.drop(self._streamed)
            self._streamed = []

    def end_step(self) -> CacheStats:
        """After each llama.cpp eval (stream_generate calls it): release the last layer, raise
        what the callback met, and return the step's cache counters."""
        self._finish_layer()
        self.tap.flush()
        del self.tap.steps[:-1]  # stream_generate takes the last step's routing; keep no history
        if self.tap.unseen:  # layer steps not stopped for: all hits
            self.cache.count_unseen(self.tap.unseen * self.top_k)
            self.tap.unseen = 0
            if not self.tap.seen:  # a decode step: no routing to show (not the last step's)
                self.tap.steps.clear()
        self.tap.seen = False
        if self.tap.error is not None:
            error, self.tap.error = self.tap.error, None
            self.llm.reset()  # the interrupted step left its KV entries unfinished: prefill again
            raise error
        return self.cache.step_stats()

    # ---- generation -----------------------------------------------------------------------
    def stream_generate(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int | None = None) -> Iterator[StepEvent]:
        with self._lock:  # waits for a reopen in progress
            self._streaming = True
        try:
            self.cache.check_file()
            yield from stream_generate(self.llm, prompt, max_tokens, temperature, self.tap, top_p=top_p, seed=seed,
                                       cache=self)
        finally:
            self._streaming = False

    def residency(self) -> CacheStats:
        """The residency now (counters since the last step are consumed, as the engine's)."""
        return self.cache.step_stats()

    def set_budget(self, budget_bytes: int) -> None:
        """Resize live (the chat's F3): evicts down to the new budget, which must still hold one
        layer's chosen experts. In the default layout, one below every expert reopens the model in
        the slots layout (llama.cpp's repacked buffers cannot give experts back). Raised back to
        every expert it stays in the slots layout, filled on demand: no second load for a resize."""
        self._check_budget(budget_bytes)
        with self._lock:
            if self.reloads_for(budget_bytes):
                self._reopen_in_slots(budget_bytes)
                return
        self.cache.set_budget(budget_bytes)

    def reloads_for(self, budget_bytes: int) -> bool:
        """Whether set_budget(budget_bytes) reloads the model (seconds: the chat runs it off its UI thread)."""
        return self.layout == "default" and not default_layout(self.config.full_layout, budget_bytes, self.full_bytes)

    def _reopen_in_slots(self, budget_bytes: int) -> None:
        mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
        if self._streaming:
            raise BudgetError(f"an expert budget of {mib(budget_bytes)}, below every expert ({mib(self.full_bytes)}), "
                              "reloads the model in the slots layout; wait for the reply to end, then set it again")
        message = (f"expert budget {mib(budget_bytes)} is below every expert ({mib(self.full_bytes)}): reloading "
                   f"{self.path.name} without llama.cpp's CPU repack (slots layout); the next prompt is prefilled whole")
        log.warning(message)
        self.warnings.append(message)
        before = self.cache.budget_bytes
        self.close()
        try:
            self._open(False, budget_bytes)
        except Exception as exc:
            # the chat must not be left without a model: load it again as it was, then say why
            self._open(True, before)
            message = (f"expert budget {mib(budget_bytes)} was not applied: reloading {self.path.name} in the slots "
                       f"layout failed ({exc}); it is open again as before, every expert resident ({mib(before)})")
            log.warning(message)
            self.warnings.append(message)
            raise BudgetError(message) from exc

    def set_policy(self, name: str) -> None:
        self.cache.set_policy(make_policy(name, seed=self.config.seed))

    def resident_expert_bytes(self) -> int | None:
        """Measured, not counted (mincore): expert pages resident in llama.cpp's mapping (in the
        page cache, or slots moved in) plus the pages still at the slots' homes (free slots, and
        the spare page of a slot whose expert's interior is one page shorter). None in the default
        layout: llama.cpp's own (repacked) buffers hold the experts there."""
        if self.pages is None:
            return None
        with self.pages.lock:
            mapped = sum(sum(resident_pages(self.pages.addr(o), n)) for o, n in expert_runs(self.geometry))
            home = sum(sum(resident_pages(a, size)) for a, size in self.pages.pool.sizes.items())
        return (mapped + home) * PAGE

    def file_rss_bytes(self) -> int | None:
        """RssFile of llama.cpp's mapping (file pages it has mapped): the dense weights after load
        (None in the default layout, which leaves llama.cpp's mapping alone)."""
        if self.pages is None:
            return None
        m = self.pages.mapping
        return mapping_rss_bytes(m.start, m.end)[0]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        self.ready = False
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.cache is not None:
            self._finish_layer()
            self.cache.close()  # drops every resident expert: slots go home, the file is mapped back
            self.cache = None
        if self.pages is not None:
            self.pages.close()
            self.pages.loader.close()
            self.pages = None
        if self.threads is not None:
            self.threads.close()
            self.threads = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None
