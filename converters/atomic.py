"""Write-then-rename: an output file appears complete or not at all."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from edgemoe.converters.errors import ConvertError


def check_output_path(out: Path) -> None:
    if not out.parent.is_dir():
        raise ConvertError(f"output folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ConvertError(f"output folder {out.parent} is not writable")
    if out.is_dir():
        raise ConvertError(f"output path {out} is a folder; give a file name such as {out / 'model.gguf'}")


@contextlib.contextmanager
def atomic_output(out: Path):
    """Yields a temporary path beside `out`; renamed to `out` only if the block completes.

    SIGTERM is turned into an exception for the duration, so `kill` also cleans up.
    """
    check_output_path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_as_interrupt(enabled: bool = True):
    """SIGTERM raises KeyboardInterrupt inside the block (main thread only), so `kill` cleans up as
    Ctrl-C does: every `finally` and `with` runs (calibration's temporary folder, a partial output)."""
    if not enabled or not _is_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
