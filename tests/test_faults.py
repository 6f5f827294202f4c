"""Faults while generating at a tight budget (expert misses read the file): an I/O error on an
expert read, the model file truncated, the model file deleted. Each is a clear edgemoe error from
the event stream (or, for a deletion, no error at all), the prefetch thread never hangs, and the
engine stays usable where it can; `edgemoe generate` prints one line, the chat shows the error and
stays open."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from edgemoe.cli import main as cli_main
from edgemoe.converters.convert import convert
from edgemoe.engine import Engine, EngineConfig
from edgemoe.gguf_file import ExpertReadError, ModelFileChanged, ModelFileError
from failing_reads import FailingReads

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "def f(x):"
N_TOKENS = 12


@pytest.fixture(scope="module")
def source(tiny_checkpoint, tmp_path_factory):
    return convert(tiny_checkpoint("mixtral"), tmp_path_factory.mktemp("faults") / "tiny.gguf", "q8_0").path


@pytest.fixture
def model(source, tmp_path):
    """A private copy: tests truncate and delete it."""
    return shutil.copy(source, tmp_path / "model.gguf")


def tight(path, **kw) -> Engine:
    """A quarter of the expert bytes: most routed experts are misses (preads)."""
    probe = Engine(path, EngineConfig(n_ctx=64, n_threads=1))
    sizes = [s.alloc_bytes for s in probe.specs.values()]
    probe.close()
    return Engine(path, EngineConfig(budget_bytes=max(sum(sizes) // 4, 2 * max(sizes)), n_ctx=64, n_threads=1, **kw))


def tokens(engine: Engine) -> list[int]:
    return [e.token for e in engine.stream_generate(PROMPT, N_TOKENS, stop_at_eos=False)]


def assert_cache_idle(engine: Engine) -> None:
    if engine.prefetcher is not None:
        engine.prefetcher.drain()  # prefetches for the next token may still be loading after a reply
    cache = engine.cache
    assert not cache.loading and not cache.state.pins and cache.in_flight_bytes == 0
    assert cache.resident_bytes <= cache.budget_bytes


@pytest.mark.parametrize("prefetch", [False, True])
def test_read_error_stops_the_reply_and_the_engine_stays_usable(model, monkeypatch, prefetch):
    engine = tight(model, prefetch=prefetch)
    expected = tokens(engine)
    engine.close()

    engine = tight(model, prefetch=prefetch)
    fail = FailingReads(monkeypatch)
    with pytest.raises(ExpertReadError, match=r"reading experts? .* from .*model\.gguf failed: Input/output error"):
        tokens(engine)
    assert_cache_idle(engine)
    fail.armed = False
    assert tokens(engine) == expected, "after a transient read error the next prompt runs normally"
    assert_cache_idle(engine)
    if prefetch:
        thread = engine.prefetcher.thread
        assert thread.is_alive()
    done = threading.Event()
    threading.Thread(target=lambda: (engine.close(), done.set()), daemon=True).start()
    assert done.wait(10), "close() hung"
    if prefetch:
        assert not thread.is_alive()


TRUNCATE = """
import json, os, sys, torch
torch.set_num_threads(1)
from edgemoe.engine import Engine, EngineConfig
from edgemoe.gguf_file import ModelFileChanged
path, keep = sys.argv[1], float(sys.argv[2])
probe = Engine(path, EngineConfig(n_ctx=64, n_threads=1))
sizes = [s.alloc_bytes for s in probe.specs.values()]
probe.close()
engine = Engine(path, EngineConfig(budget_bytes=max(sum(sizes) // 4, 2 * max(sizes)), n_ctx=64, n_threads=1))
out = {"before": 0}
stream = engine.stream_generate("def f(x):", 12, stop_at_eos=False)
try:
    for event in stream:
        out["before"] += 1
        if out["before"] == 2:
            os.truncate(path, int(os.path.getsize(path) * keep))
except ModelFileChanged as exc:
    out["error"] = str(exc)
try:  # the next prompt: refused at once, before any mapped page is touched
    list(engine.stream_generate("x", 2))
except ModelFileChanged as exc:
    out["again"] = str(exc)
engine.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.05])
def test_truncated_while_running_is_a_clear_error_not_a_crash(model, keep):
    """In a child process: a dense weight page past the cut would be SIGBUS, not an exception."""
    done = subprocess.run([sys.executable, "-c", TRUNCATE, str(model), str(keep)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["before"] == 2
    assert "model.gguf changed while running" in out["error"] and "open the model again" in out["error"]
    assert out["again"] == out["error"]


def test_deleted_while_running_keeps_generating(model):
    """Linux keeps an unlinked file's bytes while an fd or mapping holds it: the reply and later
    replies go on from the same bytes; only opening the path again fails."""
    engine = tight(model)
    expected = tokens(engine)
    engine.close()
    engine = tight(model)
    got = []
    for event in engine.stream_generate(PROMPT, N_TOKENS, stop_at_eos=False):
        got.append(event.token)
        if len(got) == 2:
            os.unlink(model)
    assert got == expected
    assert tokens(engine) == expected
    engine.close()
    with pytest.raises(ModelFileError, match="does not exist"):
        Engine(model)


def test_rewritten_in_place_is_detected(model):
    """Same size, new bytes (e.g. `cp other.gguf model.gguf`): the mtime tells."""
    engine = tight(model)
    stream = engine.stream_generate(PROMPT, N_TOKENS, stop_at_eos=False)
    next(stream)
    data = model.read_bytes()
    st = os.stat(model)
    model.write_bytes(data)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ModelFileChanged):
        list(stream)
    engine.close()


def test_cli_generate_read_error_is_one_line(model, monkeypatch, capsys):
    FailingReads(monkeypatch, after=1)
    rc = cli_main(["generate", str(model), "-p", PROMPT, "-n", "8", "--budget", "25%", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("edgemoe generate: error: reading expert") and "model.gguf" in lines[-1]


def test_cli_generate_missing_model_is_one_line(tmp_path, capsys):
    rc = cli_main(["generate", str(tmp_path / "gone.gguf"), "-p", PROMPT, "-n", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "gone.gguf" in err


@pytest.mark.asyncio
async def test_chat_shows_a_read_error_and_stays_usable(model, monkeypatch):
    from test_tui_fakes import send, wait_reply

    from edgemoe.tui import Sampling, create_app, open_backend

    engine = tight(model)
    budget = engine.cache.budget_bytes
    expected = engine.tokenizer.decode(tokens(engine))
    engine.close()
    backend = open_backend(model, "edgemoe", EngineConfig(budget_bytes=budget, n_ctx=64, n_threads=1))
    app = create_app(backend, Sampling(0.0, 1.0, N_TOKENS))
    fail = FailingReads(monkeypatch)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, app, PROMPT)
            await wait_reply(pilot, app)
            messages = app.chat.log_view.messages
            assert messages[-1].role == "error" and "ExpertReadError" in messages[-1].text
            assert "model.gguf" in messages[-1].text
            assert app.is_running
            fail.armed = False
            await send(pilot, app, PROMPT)
            await wait_reply(pilot, app)
            assert app.chat.log_view.messages[-1].role == "assistant"
            assert app.chat.log_view.messages[-1].text
    finally:
        backend.close()
    assert expected  # the same prompt runs outside the chat too
