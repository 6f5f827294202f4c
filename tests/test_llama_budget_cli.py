"""The budgeted llama mode from the outside: `generate --backend llama --budget/--max-memory`,
the chat backend's live budget and policy, and one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgemoe.demo import demo_gguf
from edgemoe.engine import EngineConfig
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.llama_backend import open_llama, stream_generate
from edgemoe.memory_cap import budget_for_cap
from edgemoe.tui import Sampling, open_backend

PROMPT = "The os module provides"


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "edgemoe.cli", *argv], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def test_generate_budgeted_llama_prints_the_same_text_as_stock():
    stock = _cli("generate", "--backend", "llama", "-n", "16", "-p", PROMPT)
    budgeted = _cli("generate", "--backend", "llama", "-n", "16", "-p", PROMPT, "--budget", "30%", "--prefetch",
                    "--policy", "lfu", "--stats")
    assert stock.returncode == 0 and budgeted.returncode == 0, budgeted.stderr
    assert budgeted.stdout == stock.stdout
    assert "backend llama + edgemoe cache" in budgeted.stderr and "hits" in budgeted.stderr
    assert "expert reads" in budgeted.stderr and "GB/s" in budgeted.stderr
    assert "GB/s (native AIO)" in budgeted.stderr or "GB/s (reader threads)" in budgeted.stderr
    threads = _cli("generate", "--backend", "llama", "-n", "4", "-p", PROMPT, "--budget", "30%",
                   env={"EDGEMOE_AIO": "0"})
    assert threads.returncode == 0 and "GB/s (reader threads)" in threads.stderr, threads.stderr
    # 100% holds every expert as the budgeted mode counts them: llama.cpp's default layout, no reads
    full = _cli("generate", "--backend", "llama", "-n", "16", "-p", PROMPT, "--budget", "100%", "--stats")
    assert full.returncode == 0 and full.stdout == stock.stdout, full.stderr
    steps = full.stderr.count("[token ")
    assert steps > 0 and full.stderr.count(" misses 0 read 0.00 MiB") == steps and "expert reads" not in full.stderr


def test_max_memory_picks_the_largest_budget_that_fits():
    path = demo_gguf()
    total = sum(s.nbytes for s in stock_experts(GGUFFile(path)).values())
    budget, plan = budget_for_cap(path, 10 * 2**30, "llama", 512)
    assert budget >= total, "a cap far above the model gives every expert"
    cap = plan.need_bytes(total // 2)
    budget, again = budget_for_cap(path, cap, "llama", 512)
    assert budget == again.max_budget(cap), "the largest budget whose plan fits the cap"
    # the runtime term is this process's RSS, which moves by a few MiB between the two calls
    assert abs(budget - total // 2) <= abs(again.runtime_bytes - plan.runtime_bytes) + 2**20
    done = _cli("generate", "--backend", "llama", "-n", "4", "--max-memory", "1GiB", "--budget", "50%")
    assert done.returncode == 2 and "not both" in done.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--backend", "llama", "--budget", "100KB"], "below one layer's 2 chosen experts"),
    (["--backend", "llama", "--max-memory", "100MiB"], "too small"),
    (["--backend", "llama", "--budget", "50%", "--dual-low", "q2_k"], "--dual-low needs --backend edgemoe"),
    (["--gpu-layers", "4"], "--gpu-layers is for --backend llama"),
])
def test_errors_are_one_line(argv, needle):
    done = _cli("generate", "-n", "4", *argv)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2


def test_chat_backend_controls_the_cache_live():
    path = demo_gguf()
    llm = open_llama(path, n_ctx=512)
    expected = "".join(e.text for e in stream_generate(llm, PROMPT, 20))
    llm.close()
    total = sum(s.nbytes for s in stock_experts(GGUFFile(path)).values())
    chat = open_backend(path, "llama", EngineConfig(budget_bytes=total // 2, n_ctx=512, prefetch=True))
    try:
        assert chat.controls_cache and chat.prefetch and chat.residency().budget_bytes == total // 2
        ids = chat.llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        events = list(chat.stream(ids, Sampling(0.0, 1.0, 20)))
        assert "".join(e.text for e in events) == expected
        assert sum(e.cache.misses for e in events) > 0
        smaller = chat.set_budget(total // 3)
        assert smaller.budget_bytes == total // 3 and smaller.resident_bytes <= total // 3
        chat.set_policy("lfu")
        with pytest.raises(ValueError, match="cannot be switched to live"):
            chat.set_policy("belady")
        with pytest.raises(ValueError, match="below one layer's"):
            chat.set_budget(1024)
        chat.llm.reset()
        again = list(chat.stream(ids, Sampling(0.0, 1.0, 20)))
        assert "".join(e.text for e in again) == expected
    finally:
        chat.close()


def test_chat_lowering_a_full_budget_reopens_the_model_in_the_slots_layout():
    """At a budget holding every expert the chat runs llama.cpp's default layout; F3 below it
    reopens the model (the chat follows the runtime's new llama.cpp context) and the text stays."""
    from edgemoe.llama_budget import budget_range

    path = demo_gguf()
    llm = open_llama(path, n_ctx=512)
    expected = "".join(e.text for e in stream_generate(llm, PROMPT, 20))
    llm.close()
    full = budget_range(path)[1]
    chat = open_backend(path, "llama", EngineConfig(budget_bytes=full, n_ctx=512))
    try:
        assert chat.runtime.layout == "default" and chat.residency().resident_bytes == full
        ids = chat.llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        events = list(chat.stream(ids, Sampling(0.0, 1.0, 20)))
        assert "".join(e.text for e in events) == expected and sum(e.cache.misses for e in events) == 0
        old_llm = chat.llm
        smaller = chat.set_budget(full // 3)
        assert chat.runtime.layout == "slots" and chat.llm is not old_llm and chat.tap is chat.runtime.tap
        assert smaller.budget_bytes == full // 3 and smaller.resident_bytes == 0
        again = list(chat.stream(ids, Sampling(0.0, 1.0, 20)))
        assert "".join(e.text for e in again) == expected and sum(e.cache.misses for e in again) > 0
    finally:
        chat.close()
