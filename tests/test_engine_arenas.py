"""Expert arenas (edgemoe/arenas.py): the memory they commit stays within the budget as it
changes, repacked arenas grow when the budget does, misses take the pages of other layouts' free
frames, and none of it changes a token."""
from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as QT

from edgemoe import llama_pages as pages
from edgemoe.converters.convert import convert
from edgemoe.engine import Engine, EngineConfig
from edgemoe.expert_store import PAGE_BYTES, find_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.native import repack
from synthetic import write_mixtral

PROMPT = "def f(x):\n    return x + 1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("arenas")
    ckpt = write_mixtral(d / "ckpt", hidden=256, ff=256, n_experts=8, n_layers=3, seed=3)
    return {q: convert(ckpt, d / f"m-{q}.gguf", q).path for q in ("q4_k", "q8_0")}


def _tokens(engine: Engine, n: int = 12) -> list[int]:
    return [e.token for e in engine.stream_generate(PROMPT, n, stop_at_eos=False)]


@pytest.mark.parametrize("qtype", ["q4_k", "q8_0"])
def test_budget_changes_keep_tokens_and_committed_memory_within_the_budget(models, qtype):
    path = models[qtype]
    full = Engine(path, EngineConfig(n_threads=1))
    want, total = _tokens(full), full.expert_bytes_total
    full.close()
    engine = Engine(path, EngineConfig(n_threads=1, budget_bytes=total // 4, repack_experts=True))
    try:
        arenas = engine.cache.arenas
        # q4_k layouts are repacked for the CPU where its build has the kernels (this one's does); q8_0 ones mapped
        assert all(a.repacked for a in arenas.by_index) == (qtype == "q4_k" and repack.repacks_type(int(QT.Q4_K)))
        n_arenas = len(arenas.by_index)
        assert _tokens(engine) == want
        assert arenas.committed_bytes <= total // 4
        engine.cache.set_budget(total)  # grows: repacked arenas add frames, mapped ones have them
        assert _tokens(engine) == want and _tokens(engine) == want
        assert arenas.committed_bytes <= total
        if arenas.repacked:
            assert len(arenas.by_index) > n_arenas
        engine.cache.set_budget(total // 3)  # shrinks: frames given back at once
        assert arenas.committed_bytes <= total // 3
        assert _tokens(engine) == want
        assert arenas.committed_bytes <= total // 3
    finally:
        engine.close()


def test_expert_arenas_are_repacked_only_when_every_expert_fits(models):
    """Below a full budget each miss would repack again (slower than its read), so arenas stay plain."""
    if not repack.repacks_type(int(QT.Q4_K)):
        pytest.skip("this CPU build has no repacked Q4_K kernels")
    path = models["q4_k"]
    total = sum(s.alloc_bytes for s in find_experts(GGUFFile(path)).values())
    for budget, repacked in ((None, True), (total, True), (total // 2, False)):
        engine = Engine(path, EngineConfig(n_threads=1, budget_bytes=budget))
        try:
            assert {a.repacked for a in engine.cache.arenas.by_index} == {repacked}, budget
        finally:
            engine.close()


def test_prefetch_into_repacked_arenas_changes_no_token(models):
    """Prefetches load (and repack) frames on their thread while the compute thread loads others."""
    path = models["q4_k"]
    full = Engine(path, EngineConfig(n_threads=1))
    want, total = _tokens(full, 24), full.expert_bytes_total
    full.close()
    engine = Engine(path, EngineConfig(n_threads=1, budget_bytes=total // 3, prefetch=True, repack_experts=True))
    try:
        assert _tokens(engine, 24) == want
        assert engine.cache.arenas.committed_bytes <= total // 3
    finally:
        engine.close()


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """Per-expert mixed types: several layouts, frames of different sizes."""
    import tiny_files

    return tiny_files.mixed("mixtral", tmp_path_factory.mktemp("arenas-mixed"))


def _resident_expert_bytes(arenas) -> int:
    """Bytes of the mapped arenas' pages that are present (mincore), what the budget governs."""
    total = 0
    for arena in arenas.by_index:
        size = -(-(arena.n_frames * arena.frame_bytes + PAGE_BYTES) // PAGE_BYTES) * PAGE_BYTES
        total += sum(pages.resident_pages(arena.memory.address, size)) * PAGE_BYTES
    return total


@pytest.mark.parametrize("mode", ["move", "mremap fails", "big frames"])
def test_misses_take_the_pages_of_other_layouts_free_frames_within_the_budget(mixed_file, mode, monkeypatch):
    """A miss over the limit moves a free frame's pages of another layout into its own (mremap);
    where moving fails, or for frames big enough to keep whole huge pages, it gives them back
    instead. Either way: same tokens, and the pages present in the arenas (mincore) stay within
    the budget after every token."""
    from edgemoe import arenas as arenas_module

    full = Engine(mixed_file, EngineConfig(n_threads=1))
    want, total = _tokens(full, 24), full.expert_bytes_total
    full.close()
    budget = total // 3
    engine = Engine(mixed_file, EngineConfig(n_threads=1, budget_bytes=budget))
    try:
        arenas = engine.cache.arenas
        assert len(arenas.by_index) > 1 and not any(a.repacked for a in arenas.by_index)
        assert max(a.frame_bytes for a in arenas.by_index) < arenas_module.MOVE_FRAME_BYTES
        if mode == "mremap fails":  # what an old kernel, or vm.max_map_count reached, does
            def refuse(*_):
                raise OSError(12, "mremap: Cannot allocate memory")
            monkeypatch.setattr(pages, "move", refuse)
        elif mode == "big frames":  # every frame counts as big
            monkeypatch.setattr(arenas_module, "MOVE_FRAME_BYTES", PAGE_BYTES)
        got = []
        for event in engine.stream_generate(PROMPT, 24, stop_at_eos=False):
            got.append(event.token)
            assert arenas.committed_bytes <= budget
            assert _resident_expert_bytes(arenas) <= budget
        assert got == want
        assert (arenas.moved_bytes > 0) == (mode == "move") and arenas.can_move == (mode != "mremap fails")
    finally:
        engine.close()


def test_big_stock_parts_are_read_in_place_with_o_direct(tmp_path):
    """A stock tensor's experts of whole pages each (parts >= CONGRUENT_MIN_BYTES) sit in their
    frames where their file offsets fall in a page: all experts of a layer keep one layout (one
    arena), misses are read with O_DIRECT straight into the frames (no bounce copy but of the
    parts' unaligned edges), and the tokens equal the full-budget engine's."""
    from edgemoe.arenas import signature
    from edgemoe.expert_store import CONGRUENT_MIN_BYTES

    ckpt = write_mixtral(tmp_path / "ckpt", hidden=512, ff=512, n_experts=4, n_layers=2, seed=5)
    path = convert(ckpt, tmp_path / "m.gguf", "q8_0").path
    specs = find_experts(GGUFFile(path))
    for spec in specs.values():
        _, positions = spec.layout()
        for p, pos in zip(spec.parts, positions):
            assert p.nbytes >= CONGRUENT_MIN_BYTES and p.nbytes % PAGE_BYTES == 0
            assert (pos - p.offset) % PAGE_BYTES == 0 and pos % 32 == 0
        assert spec.alloc_bytes - spec.nbytes < len(spec.parts) * PAGE_BYTES + PAGE_BYTES
    for layer in {k[0] for k in specs}:
        assert len({signature(s) for k, s in specs.items() if k[0] == layer}) == 1
    full = Engine(path, EngineConfig(n_threads=1, repack_experts=False))
    want, total = _tokens(full), full.expert_bytes_total
    full.close()
    engine = Engine(path, EngineConfig(n_threads=1, budget_bytes=total * 3 // 8, repack_experts=False))
    try:
        assert _tokens(engine) == want
        stats = engine.cache.loader.stats()
        # only each part's unaligned head and tail (under a block each) go through a bounce buffer
        smallest = min(p.nbytes for spec in specs.values() for p in spec.parts)
        assert stats.bytes_read > 0 and stats.bounced_bytes <= stats.bytes_read * 2 * PAGE_BYTES // smallest
        if engine.cache.loader.direct:
            assert stats.direct_bytes == stats.bytes_read
    finally:
        engine.close()
