"""The `llama` backend: stock GGUF files run unchanged through llama-cpp-python.

It is both a product backend and the baseline every benchmark compares against. With
`routing=True` it also reports which experts each token chose, read from llama.cpp's
`ffn_moe_topk-<layer>` graph tensors through the eval callback (public ggml API only).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from edgemoe.errors import InputError
from edgemoe.events import CacheStats, StepEvent
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.memory import peak_rss_bytes
from edgemoe.text import split_complete_utf8


class RoutingTap:
    """Collects ffn_moe_topk-<layer> (int32 [tokens, top_k]) from every llama.cpp graph eval.

    llama.cpp computes only the last token in the last layer of a prefill, so that layer's
    entry holds one row there."""

    PREFIX = b"ffn_moe_topk-"

    def __init__(self, top_k: int, n_expert: int):
        import llama_cpp

        from edgemoe.native.lib import ggml_base

        self.top_k, self.n_expert = top_k, n_expert
        self.lib = ggml_base()
        self.lib.ggml_get_name.restype = ctypes.c_char_p
        self.lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        self.lib.ggml_nelements.restype = ctypes.c_int64
        self.lib.ggml_nelements.argtypes = [ctypes.c_void_p]
        self.lib.ggml_is_contiguous.restype = ctypes.c_bool
        self.lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
        self.steps: list[dict[int, list[list[int]]]] = []
        self._current: dict[int, list[list[int]]] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)

    def _on_tensor(self, tensor, ask, user_data) -> bool:
        name = self.lib.ggml_get_name(tensor) or b""
        if ask:
            return name.startswith(self.PREFIX)
        if name.startswith(self.PREFIX):
            layer = int(name[len(self.PREFIX):])
            k = self.top_k
            n_tokens = self.lib.ggml_nelements(tensor) // k
            # top-k is a view of the full argsort [n_expert, tokens]: rows are n_expert apart
            stride = k if self.lib.ggml_is_contiguous(tensor) else self.n_expert
            n = (n_tokens - 1) * stride + k
            buf = (ctypes.c_int32 * n)()
            self.lib.ggml_backend_tensor_get(tensor, ctypes.cast(buf, ctypes.c_void_p), 0, n * 4)
            ids = list(buf)
            if layer in self._current:
                self.flush()
            self._current[layer] = [ids[t * stride:t * stride + k] for t in range(n_tokens)]
        return True

    def flush(self) -> None:
        if self._current:
            self.steps.append(self._current)
            self._current = {}

    def take_last(self) -> dict[int, list[list[int]]]:
        self.flush()
        return self.steps[-1] if self.steps else {}


def open_llama(path: Path, n_ctx: int = 512, seed: int = 0, logits_all: bool = False, f32_kv: bool = False,
               routing: RoutingTap | None = None, n_threads: int | None = None, model_params: dict | None = None,
               context_params: dict | None = None, on_progress: Callable[[int, int], None] | None = None):
    """model_params / context_params: llama_model_params / llama_context_params fields to set
    beyond what Llama() sets (the budgeted mode's use_extra_bufts=False, GPU buffer overrides).
    `on_progress(done, total)`: llama.cpp's load progress, as bytes of the file (its fraction
    times the file's size), called on the loading thread."""
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as low_level  # the module Llama() itself calls into

    model = GGUFFile(path)  # validates offsets and sizes before llama.cpp touches the file
    from edgemoe.layout import is_extended

    if is_extended(model):  # other edgemoe. keys (an embedded predictor) are metadata llama.cpp ignores
        raise ModelFileError(f"{path} uses edgemoe's extended layout, which stock llama.cpp cannot load; "
                             "use --backend edgemoe")
    from edgemoe.legacy import check_current_layout

    check_current_layout(model)
    kv = dict(type_k=0, type_v=0, flash_attn=False) if f32_kv else {}
    # every core by default, as the engine (llama-cpp-python's own default decodes on half of them)
    n_threads = n_threads or os.cpu_count() or 1
    kv.update(n_threads=n_threads, n_threads_batch=n_threads)
    model_params = dict(model_params or {})
    if on_progress is not None:
        size = Path(path).stat().st_size

        def progress(fraction: float, _user) -> bool:
            on_progress(int(fraction * size), size)
            return True  # False would cancel the load
        model_params["progress_callback"] = low_level.llama_progress_callback(progress)  # alive until Llama returns
    with _eval_callback(low_level, routing, context_params), _model_params(low_level, model_params):
        try:
            return Llama(str(path), n_ctx=n_ctx, seed=seed, logits_all=logits_all, verbose=False, **kv)
        except ValueError as exc:
            raise ModelFileError(f"llama.cpp could not load {path}: {exc}") from exc


class AttachedThreadpool:
    """A persistent ggml thread pool attached to a llama.cpp context. Without one, llama.cpp's CPU
    backend creates and joins its threads for every graph compute; an eval callback that asks for
    tensors splits each token into 2 computes per layer + 1, so the budgeted mode pays that 2L+1
    times per token (the demo: 96-165 tok/s vs plain llama.cpp's 400-4,500 on a busy machine)."""

    def __init__(self, llm):
        from llama_cpp import llama_cpp as low

        from edgemoe.native.backend import new_threadpool

        self.llm, self.lib = llm, low._lib
        self.lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.llama_attach_threadpool.restype = None
        self.lib.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        self.lib.llama_detach_threadpool.restype = None
        # as many workers as the larger of the decode and batch thread counts: a compute asking for
        # more threads than its pool has reads past the pool's workers (a segfault)
        self.pool = new_threadpool(max(llm.n_threads, llm.n_threads_batch))
        self.lib.llama_attach_threadpool(llm.ctx, self.pool, None)  # the batch pool defaults to this one

    def close(self) -> None:
        if self.pool:
            from edgemoe.native.lib import ggml_cpu

            ctx = getattr(getattr(self.llm, "_ctx", None), "ctx", None)  # call before the context is freed
            if ctx:
                self.lib.llama_detach_threadpool(ctx)
            ggml_cpu().ggml_threadpool_free(self.pool)
            self.pool = None


@contextlib.contextmanager
def _eval_callback(llama_cpp, routing: RoutingTap | None, fields: dict | None = None):
    """Llama() builds its context params from llama_context_default_params(); hand it ours."""
    extra = dict(fields or {})
    if routing is not None:
        extra.update(cb_eval=routing.callback, cb_eval_user_data=None)
    with _defaults(llama_cpp, "llama_context_default_params", extra):
        yield


def _model_params(llama_cpp, fields: dict | None):
    """Llama() starts from llama_model_default_params() and sets only what it knows (n_gpu_layers,
    load mode, ...); fields it does not know (use_extra_bufts, tensor_buft_overrides) go here."""
    return _defaults(llama_cpp, "llama_model_default_params", fields or {})


@contextlib.contextmanager
def _defaults(llama_cpp, name: str, fields: dict):
    if not fields:
        yield
        return
    original = getattr(llama_cpp, name)

    def with_fields():
        params = original()
        for key, value in fields.items():
            setattr(params, key, value)
        return params

    setattr(llama_cpp, name, with_fields)
    try:
        yield
    finally:
        setattr(llama_cpp, name, original)


def stream_generate(llm, prompt: str | list[int], max_tokens: int, temperature: float = 0.0,
                    routing: RoutingTap | None = None, *, top_p: float = 1.0,
                    seed: int | None = None, cache=None) -> Iterator[StepEvent]:
    """One event per generated token, as the engine's `stream_generate`. Sampling is the
    engine's too: temperature and top-p only (no top-k, no min-p). `prompt`: text (BOS added)
    or token ids (chat-template markers stay special tokens). llama-cpp-python's generate keeps
    the longest common prefix of the tokens it last evaluated and this prompt (call
    `llm.reset()` first to prefill it whole); `kv_reused_tokens` says how many it kept."""
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False) if isinstance(prompt, str) else list(prompt)
    if len(ids) + max_tokens > llm.n_ctx():
        raise InputError(f"prompt ({len(ids)} tokens) + {max_tokens} new tokens exceed the context "
                         f"of {llm.n_ctx()}; raise --ctx or shorten the prompt")
    if seed is not None:
        llm.set_seed(seed)  # generate builds its sampler from this seed
    cached = llm.input_ids[:llm.n_tokens].tolist()
    # what generate will keep (its own prefix rule: the last prompt token is re-run for its logits)
    reused = max(min(llm.longest_token_prefix(cached, ids), len(ids) - 1), 0)
    start = time.perf_counter()
    first = None
    pending, prompt_len = b"", len(ids)
    for i, token in enumerate(llm.generate(ids, temp=temperature, top_k=0, top_p=top_p, min_p=0.0,
                                           repeat_penalty=1.0, reset=True)):
        eos = token == llm.token_eos()
        if i >= max_tokens:
            break
        now = time.perf_counter()
        first = first if first is not None else now
        text = ""
        if not eos:
            pending += llm.detokenize([token], prev_tokens=ids)
            text, pending = split_complete_utf8(pending)
        ids.append(token)
        stats = cache.end_step() if cache is not None else CacheStats()  # the budgeted mode (llama_budget.py)
        chosen = routing.take_last() if routing else {}
        layers = tuple(tuple(chosen[k][-1]) if chosen.get(k) else () for k in sorted(chosen))
        tps = i / (now - first) if i > 0 and now > first else 0.0
        finish = "stop" if eos else "length" if i == max_tokens - 1 else ""
        yield StepEvent(i, token, text, now - start, tps, stats, peak_rss_bytes=peak_rss_bytes(), routing=layers,
                        finished=bool(finish), finish_reason=finish, prompt_tokens=prompt_len,
                        kv_reused_tokens=reused)
        if finish:
            break
