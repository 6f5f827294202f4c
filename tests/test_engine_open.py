"""A failed Engine open frees what it made so far: the expert cache's file descriptor, the compute
backend and the dual-precision loader thread (a thread whose target holds the cache, so garbage
collection alone never frees either). Failures after the cache exists: a vocabulary llama.cpp
refuses (the tokenizer), an unknown predictor (the prefetcher)."""
from __future__ import annotations

import gc
import os
import shutil
import threading

import pytest

import tiny_files
from edgemoe.engine import Engine, EngineConfig
from edgemoe.gguf_file import ModelFileError
from edgemoe.predictor.base import PredictorError
from gguf_edit import set_string

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_files.stock("mixtral", "q8_0", tmp_path_factory.mktemp("engine-open"))


@pytest.fixture
def bad_vocab(model, tmp_path):
    """The tiny Mixtral with a tokenizer model llama.cpp does not know (its vocab load fails after
    the engine has made its cache)."""
    path = tmp_path / "bad-vocab.gguf"
    shutil.copy(model, path)
    set_string(path, "tokenizer.ggml.model", "xxxxx")  # was "llama" (SentencePiece)
    return path


@pytest.mark.parametrize("failure", ["tokenizer", "predictor"])
def test_failed_open_leaks_no_fd_or_thread(model, bad_vocab, failure):
    path, error, extra = {"tokenizer": (bad_vocab, ModelFileError, {}),
                          "predictor": (model, PredictorError, {"prefetch": True, "predictor": "bogus"})}[failure]
    config = EngineConfig(n_threads=1, n_ctx=32, dual_low_type="q2_k", **extra)
    Engine(model, EngineConfig(n_threads=1, n_ctx=32)).close()  # libraries loaded, lazy imports done
    gc.collect()
    fds, threads = _open_fds(), threading.active_count()
    for _ in range(3):
        with pytest.raises(error):
            Engine(path, config)
    gc.collect()
    assert (_open_fds(), threading.active_count()) == (fds, threads)
    assert not any(t.name == "edgemoe-dual-load" for t in threading.enumerate())
