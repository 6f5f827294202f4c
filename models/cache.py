"""Where models/ keeps things it builds once: the corpus, tokenizers, tiny checkpoints.

Everything here is derived data (rebuildable from this package and the Python install), so it
lives in a user cache directory rather than in the source tree. `EDGEMOE_CACHE` overrides the
location, e.g. to give CI a fresh directory or to keep tests off a home directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) `$EDGEMOE_CACHE/<parts...>`, default `~/.cache/edgemoe/<parts...>`."""
    root = os.environ.get("EDGEMOE_CACHE") or Path.home() / ".cache" / "edgemoe"
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write via a per-process temp file + rename, so concurrent readers (parallel test workers,
    a second build racing the first) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and rename the result to `final`. A concurrent builder that got there
    first wins and ours is discarded: readers only ever see complete folders."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared cache folder
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
