"""Shared pytest fixtures.

Reference models are tiny seeded transformers checkpoints built by `edgemoe.models.tiny` (cached
on disk under `$EDGEMOE_CACHE`, default ~/.cache/edgemoe, so a second session reuses them). No test
ever reaches the Hugging Face hub.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Callable[..., Path]:
    """Factory `tiny_checkpoint(arch, seed=0) -> Path`: folder of a tiny HF checkpoint
    (config.json, model.safetensors with hub per-expert names, tokenizer files).

    Shared by every test in the session: treat it as read-only; copy it first
    (`edgemoe.models.tiny.build_tiny(arch, tmp_path)`) to modify files."""
    from edgemoe.models.tiny import tiny_checkpoint as build

    return functools.cache(build)


@pytest.fixture
def one_torch_thread():
    """torch with one intra-op thread for the test: on shared, oversubscribed cores torch's pool
    runs small matmuls up to ~10x slower than one thread does."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
