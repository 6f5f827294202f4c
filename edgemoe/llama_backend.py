"""The `llama` backend: stock GGUF files run unchanged through llama-cpp-python.

It is both a product backend and the baseline every benchmark compares against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgemoe.gguf_file import GGUFFile, ModelFileError


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as every consumer (CLI, TUI, benchmarks) sees it."""
    index: int
    token: int
    text: str
    elapsed_s: float
    tokens_per_s: float


def open_llama(path: Path, n_ctx: int = 512, seed: int = 0, logits_all: bool = False, f32_kv: bool = False):
    from llama_cpp import Llama

    model = GGUFFile(path)  # validates offsets and sizes before llama.cpp touches the file
    if model.keys() and any(k.startswith("edgemoe.") for k in model.keys()):
        raise ModelFileError(f"{path} uses edgemoe's extended layout, which stock llama.cpp cannot load; "
                             "use --backend edgemoe")
    kv = dict(type_k=0, type_v=0, flash_attn=False) if f32_kv else {}
    try:
        return Llama(str(path), n_ctx=n_ctx, seed=seed, logits_all=logits_all, verbose=False, **kv)
    except ValueError as exc:
        raise ModelFileError(f"llama.cpp could not load {path}: {exc}") from exc


def stream_generate(llm, prompt: str, max_tokens: int, temperature: float = 0.0) -> Iterator[TokenEvent]:
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    start = time.perf_counter()
    pending = b""
    for i, token in enumerate(llm.generate(ids, temp=temperature, top_k=0 if temperature == 0 else 40,
                                           top_p=1.0, repeat_penalty=1.0, reset=True)):
        if token == llm.token_eos() or i >= max_tokens:
            break
        pending += llm.detokenize([token], prev_tokens=ids)
        ids.append(token)
        text, pending = _complete_utf8(pending)
        elapsed = time.perf_counter() - start
        yield TokenEvent(i, token, text, elapsed, (i + 1) / elapsed if elapsed > 0 else 0.0)


def _complete_utf8(buf: bytes) -> tuple[str, bytes]:
    """Split off a trailing incomplete UTF-8 sequence (a token may end mid-character)."""
    for cut in range(len(buf), max(len(buf) - 4, -1), -1):
        try:
            return buf[:cut].decode("utf-8"), buf[cut:]
        except UnicodeDecodeError:
            continue
    return buf.decode("utf-8", errors="replace"), b""
