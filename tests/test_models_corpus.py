"""The demo corpus: built from the local Python install, deterministic, split by document."""

from __future__ import annotations

from edgemoe.models.corpus import build_corpus, is_heldout, load_corpus, pydoc_topics


def test_corpus_size_and_split():
    corpus = load_corpus()
    assert corpus.total_chars > 1_000_000
    n_docs = len(corpus.train) + len(corpus.heldout)
    assert 0.03 < len(corpus.heldout) / n_docs < 0.07
    assert not set(corpus.train) & set(corpus.heldout)
    assert len(set(corpus.train)) == len(corpus.train), "duplicates survived"
    assert all(not is_heldout(d) for d in corpus.train[:500])
    assert all(is_heldout(d) for d in corpus.heldout)


def test_corpus_sources():
    corpus = load_corpus()
    docs = set(corpus.train) | set(corpus.heldout)
    assert set(pydoc_topics()) <= docs
    assert any(d.startswith("Return a new list containing all items from the iterable") for d in docs)


def test_cache_matches_a_fresh_build(tmp_path, monkeypatch):
    cached = load_corpus()
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path))
    fresh = build_corpus()
    assert fresh.train == cached.train and fresh.heldout == cached.heldout
