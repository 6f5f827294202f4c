"""The demo corpus: text that every Python install carries, so training needs no download.

Sources, in this order: docstrings of the standard library (modules, classes, functions, methods;
collected in a child process by `models/stdlib_docs.py`) and the pydoc topics
(`pydoc_data.topics.topics`, the reference manual sections behind `help("if")`). Documents are
cleaned with `inspect.cleandoc`, deduplicated (first occurrence wins) and split by document into
train and held-out with a content hash, so the split does not move when documents are added or
reordered, and is the same on every machine with the same Python version.

The result is cached as JSON under `cache_dir("corpus")`, keyed by Python version.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgemoe.models.cache import cache_dir, write_atomic

HELDOUT_PER_MILLE = 50  # ~5% of documents
CORPUS_VERSION = 1  # bump when collection or split changes, to invalidate caches
COLLECT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Corpus:
    """Documents (one docstring or pydoc topic each), split by document."""

    train: list[str]
    heldout: list[str]

    @property
    def train_chars(self) -> int:
        return sum(map(len, self.train))

    @property
    def heldout_chars(self) -> int:
        return sum(map(len, self.heldout))

    @property
    def total_chars(self) -> int:
        return self.train_chars + self.heldout_chars


def is_heldout(doc: str) -> bool:
    """Hash-based split: stable under reordering, independent of every other document."""
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 1000 < HELDOUT_PER_MILLE


def stdlib_docstrings() -> list[str]:
    """Run the collector in an isolated child process (imports have side effects; see there)."""
    script = Path(__file__).with_name("stdlib_docs.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docs.json"
        subprocess.run(
            [sys.executable, "-I", str(script), str(out)],
            cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=COLLECT_TIMEOUT_S, check=True,
        )
        return json.loads(out.read_text(encoding="utf-8"))


def pydoc_topics() -> list[str]:
    """The reference-manual sections pydoc ships, in sorted topic order."""
    from pydoc_data.topics import topics

    return [inspect.cleandoc(topics[name]) for name in sorted(topics)]


def build_corpus() -> Corpus:
    """Collect, dedupe and split; deterministic for a given Python install."""
    seen: set[str] = set()
    train: list[str] = []
    heldout: list[str] = []
    for doc in stdlib_docstrings() + pydoc_topics():
        if doc in seen:
            continue
        seen.add(doc)
        (heldout if is_heldout(doc) else train).append(doc)
    return Corpus(train=train, heldout=heldout)


def corpus_path() -> Path:
    """Cache file; the Python version is in the name because docstrings change between releases."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir("corpus") / f"corpus-{version}-v{CORPUS_VERSION}.json"


def load_corpus() -> Corpus:
    """The cached corpus, built on first use (about a second)."""
    path = corpus_path()
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        return Corpus(train=data["train"], heldout=data["heldout"])
    corpus = build_corpus()
    data = {
        "python": sys.version,
        "train": corpus.train,
        "heldout": corpus.heldout,
        "total_chars": corpus.total_chars,
    }
    write_atomic(path, json.dumps(data))
    return corpus


if __name__ == "__main__":
    c = load_corpus()
    print(f"{corpus_path()}: {len(c.train)} train / {len(c.heldout)} held-out documents, "
          f"{c.train_chars} / {c.heldout_chars} chars ({c.total_chars} total)")
