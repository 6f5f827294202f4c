"""Budgeted llama.cpp (`--backend llama --budget`): the same greedy tokens as plain llama.cpp at
every budget, policy and prefetch setting; the budget is hard where the kernel can tell (mincore
after every token); RssFile falls to the dense weights after load; clear one-line refusals. A
budget holding every expert runs llama.cpp's default layout (CPU repack: the same logits as plain
llama.cpp), and lowering it live reopens the model in the slots layout."""
from __future__ import annotations

import errno
import os
import shutil
from types import SimpleNamespace

import pytest

from edgemoe.converters.convert import convert
from edgemoe.demo import demo_gguf
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import ExpertReadError, GGUFFile
from edgemoe.llama_backend import open_llama, stream_generate
from edgemoe.errors import InputError
from edgemoe.llama_budget import BudgetedConfig, BudgetedLlama, LlamaApiMissing, budget_range, check_api
from edgemoe.llama_pages import PAGE
from edgemoe.residency import BudgetError
from failing_reads import FailingReads

PROMPT = 'def read_file(path):\n    """Return the'
N_TOKENS = 24


def _private_copy(src, dest):
    """A copy no other test maps, written back so its page-cache pages can be dropped."""
    shutil.copy(src, dest)
    fd = os.open(dest, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return dest


def _plain_tokens(path) -> list[int]:
    llm = open_llama(path, n_ctx=256)
    try:
        return [e.token for e in stream_generate(llm, PROMPT, N_TOKENS)]
    finally:
        llm.close()


def _expert_total(path) -> int:
    return sum(s.nbytes for s in stock_experts(GGUFFile(path)).values())


def _dense_page_bytes(path) -> int:
    pages = set()
    for t in GGUFFile(path).tensors.values():
        if not t.is_expert:
            pages.update(range(t.offset // PAGE, -(-(t.offset + t.nbytes) // PAGE)))
    return len(pages) * PAGE


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = _private_copy(demo_gguf(), tmp_path_factory.mktemp("llama_budget") / "demo.gguf")
    return path, _plain_tokens(path)


def _run(path, share, full_layout=False, **kw):
    """The slots layout unless asked: its pages are what mincore measures."""
    budget = int(_expert_total(path) * share)
    rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=budget, n_ctx=256, full_layout=full_layout, **kw))
    try:
        after_load = rt.file_rss_bytes()
        events, checks = _stream_checked(rt)
        return rt, events, after_load, checks
    finally:
        rt.close()


def _stream_checked(rt):
    events, checks = [], []
    for event in rt.stream_generate(PROMPT, N_TOKENS):
        events.append(event)
        # between tokens no expert is being computed: everything resident is within the budget
        checks.append((rt.resident_expert_bytes(), rt.cache.resident_bytes + rt.cache.in_flight_bytes,
                       rt.file_rss_bytes()))
    return events, checks


CASES = [(1.0, "lru", None), (0.6, "lru", None), (0.3, "lru", None), (0.3, "lfu", None), (0.3, "random", None),
         (0.3, "hybrid", "router"), (0.3, "lru", "router"), (0.6, "lru", "prior"), (0.15, "lru", "router")]


@pytest.mark.parametrize("share,policy,predictor", CASES)
def test_tokens_equal_plain_llama_and_the_budget_holds(demo, share, policy, predictor):
    path, expected = demo
    rt, events, after_load, checks = _run(path, share, policy=policy, prefetch=predictor is not None,
                                          predictor=predictor or "router")
    assert [e.token for e in events] == expected
    dense = _dense_page_bytes(path)
    assert after_load <= dense, "after load llama.cpp's mapping holds only dense pages"
    budget = rt.config.budget_bytes
    for measured, counted, file_rss in checks:
        assert measured <= budget and counted <= budget
        assert file_rss <= dense + counted, "file pages mapped: dense plus resident experts' edges"
    misses = sum(e.cache.misses for e in events)
    assert (misses > 0) == (share < 1.0 or misses > 0)
    if share < 1.0:
        assert sum(e.cache.evictions for e in events) > 0
    if predictor:
        assert sum(e.cache.prefetch_issued for e in events) > 0
    assert events[-1].cache.budget_bytes == budget and events[-1].routing


def test_resident_bytes_track_the_cache(demo):
    path, _ = demo
    rt, events, _, checks = _run(path, 0.5)
    # measured (mincore) vs counted (the cache's charges): close, measured never above
    for measured, counted, _ in checks:
        assert counted - 64 * PAGE <= measured <= counted + 8 * PAGE


def test_budget_below_one_layers_experts_is_refused(demo):
    path, _ = demo
    with pytest.raises(BudgetError, match=r"below one layer's 2 chosen experts .*raise --budget"):
        BudgetedLlama(path, BudgetedConfig(budget_bytes=int(_expert_total(path) * 0.05)))


def test_missing_llama_api_is_one_clear_line(monkeypatch):
    import llama_cpp.llama_cpp as low

    fields = [f for f in low.llama_model_params._fields_ if f[0] != "use_extra_bufts"]
    fake = SimpleNamespace(llama_model_params=SimpleNamespace(_fields_=fields),
                           llama_context_params=low.llama_context_params)
    monkeypatch.setattr("edgemoe.llama_load._low_level", lambda: fake)
    with pytest.raises(LlamaApiMissing, match=r"lacks llama_model_params.use_extra_bufts, which the budgeted"):
        check_api()


def test_gpu_layers_on_a_cpu_build_are_refused(demo):
    import llama_cpp.llama_cpp as low

    if low.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build has a GPU backend")
    with pytest.raises(LlamaApiMissing, match="has no GPU backend"):
        BudgetedLlama(demo[0], BudgetedConfig(budget_bytes=_expert_total(demo[0]), gpu_layers=99))


def test_load_params_offload_dense_layers_with_or_without_expert_overrides():
    """n_gpu_layers is set whenever GPU layers are asked for, tensor buffer overrides only with
    expert_overrides (both layouts); the CPU-only slots layout sets neither."""
    from edgemoe.llama_load import load_params

    model, context, keep = load_params(0, False)
    assert model == dict(use_extra_bufts=False, lazy_mode=0) and context == {} and keep is None
    model, context, keep = load_params(8, False)
    assert model["n_gpu_layers"] == 8 and "tensor_buft_overrides" not in model and keep is None
    assert context == dict(op_offload=False)
    model, context, keep = load_params(8, True, default_layout=True)
    assert model["n_gpu_layers"] == 8 and model["tensor_buft_overrides"] and keep is not None
    assert "use_extra_bufts" not in model and context == {}


def test_expert_buffer_overrides_keep_experts_in_the_mapping(demo):
    """The GPU path's tensor_buft_overrides (experts in CPU memory, as --cpu-moe), exercised on
    the CPU build: llama.cpp still computes on its mapping and the tokens do not change."""
    path, expected = demo
    rt, events, after_load, _ = _run(path, 0.3, expert_overrides=True)
    assert [e.token for e in events] == expected
    assert after_load <= _dense_page_bytes(path)


def test_read_error_stops_the_reply_cleanly(demo, monkeypatch):
    path, expected = demo
    rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=int(_expert_total(path) * 0.3), n_ctx=256))
    try:
        fail = FailingReads(monkeypatch, after=5)
        with pytest.raises(ExpertReadError, match=r"reading expert.* failed: Input/output error"):
            list(rt.stream_generate(PROMPT, N_TOKENS))
        fail.armed = False
        assert not rt.cache.state.pins and not rt.cache.loading and rt.cache.in_flight_bytes == 0
        assert rt.resident_expert_bytes() <= rt.config.budget_bytes
        assert [e.token for e in rt.stream_generate(PROMPT, N_TOKENS)] == expected, "the next reply is normal"
    finally:
        rt.close()


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "deepseek2"])
def test_other_architectures(arch, tiny_checkpoint, tmp_path):
    path = convert(tiny_checkpoint(arch), tmp_path / "m.gguf", "q8_0").path
    _private_copy(path, tmp_path / "copy.gguf")
    expected = _plain_tokens(tmp_path / "copy.gguf")
    rt, events, _, checks = _run(tmp_path / "copy.gguf", 0.4, prefetch=True)
    assert [e.token for e in events] == expected
    assert all(m <= rt.config.budget_bytes for m, _, _ in checks), (rt.config.budget_bytes, [c for c in checks if c[0] > rt.config.budget_bytes])
    assert sum(e.cache.misses for e in events) > 0


# ---- a budget that holds every expert: llama.cpp's default layout ---------------------------
def test_full_budget_runs_the_default_layout_and_counts_every_expert_a_hit(demo):
    path, expected = demo
    full = budget_range(path)[1]
    rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=full + 4096, n_ctx=256, prefetch=True))
    try:
        assert rt.layout == "default" and rt.prefetcher is None, "nothing to prefetch: every expert is resident"
        assert rt.resident_expert_bytes() is None, "llama.cpp's own buffers: nothing for mincore to attribute"
        events = list(rt.stream_generate(PROMPT, N_TOKENS))
        assert [e.token for e in events] == expected
        n_moe = len(rt.moe_layers)
        for e in events:
            c = e.cache
            assert c.misses == c.evictions == c.bytes_read == c.prefetch_issued == 0
            assert c.resident_bytes == full and c.budget_bytes == full + 4096
            assert set(c.resident_experts) == set(rt.specs)
        for e in events[1:]:  # a decode token: each MoE layer routes it to top_k distinct experts, all hits
            assert e.cache.hits == e.cache.token_slots == n_moe * rt.top_k
        assert events[0].cache.hits > n_moe * rt.top_k, "the prefill's tokens are counted too"
        assert rt.cache.loader.stats().reads == 0, "llama.cpp read the experts while loading, the cache reads none"
        # decode steps are not stopped for unless routing is wanted (the chat's heatmap): same counts
        assert all(e.routing == () for e in events[1:]) and len(events[0].routing) == n_moe
        rt.observe_routing = True
        seen = list(rt.stream_generate(PROMPT, N_TOKENS))
        assert [e.token for e in seen] == expected
        assert all(len(e.routing) == n_moe for e in seen)
        assert [(e.cache.hits, e.cache.token_slots) for e in seen[1:]] == [(e.cache.hits, e.cache.token_slots)
                                                                           for e in events[1:]]
        rt.observe_routing = False

        stream = rt.stream_generate(PROMPT, N_TOKENS)
        next(stream)
        with pytest.raises(BudgetError, match="wait for the reply to end"):
            rt.set_budget(full // 2)
        stream.close()
        assert rt.layout == "default"

        rt.set_budget(full // 2)  # below every expert: reopened in the slots layout
        assert rt.layout == "slots" and rt.prefetcher is not None and "slots layout" in rt.warnings[-1]
        events, checks = _stream_checked(rt)
        assert [e.token for e in events] == expected
        assert sum(e.cache.misses for e in events) > 0
        for measured, counted, _ in checks:
            assert measured <= full // 2 and counted <= full // 2
        rt.set_budget(full)  # back up: stays in the slots layout, the cache fills on demand
        assert rt.layout == "slots" and rt.cache.budget_bytes == full
        assert [e.token for e in rt.stream_generate(PROMPT, N_TOKENS)] == expected
    finally:
        rt.close()


def test_llama_load_progress_rises_to_the_file_size(demo):
    """open_llama's and BudgetedLlama's on_progress: llama.cpp's load, as bytes of the file, rising
    to its size (the bar `generate`/`chat`/`serve --backend llama` show on a terminal)."""
    path, _ = demo
    size = os.path.getsize(path)
    seen = []
    open_llama(path, n_ctx=64, on_progress=lambda done, total: seen.append((done, total))).close()
    assert seen and all(total == size for _, total in seen) and seen[-1][0] == size
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen.clear()
    BudgetedLlama(path, BudgetedConfig(budget_bytes=budget_range(path)[1], n_ctx=64),
                  on_progress=lambda *a: seen.append(a)).close()
    assert seen and seen[-1] == (size, size)


def test_a_failed_reopen_in_slots_leaves_the_model_open_as_before(demo, monkeypatch):
    """Lowering the budget below every expert reloads in the slots layout; when that load fails
    the runtime loads the default layout again at the old budget (the chat keeps a model), and
    the error says so."""
    path, expected = demo
    full = budget_range(path)[1]
    rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=full, n_ctx=256))
    try:
        assert rt.layout == "default"
        load = BudgetedLlama._load

        def failing(self, default, budget_bytes):
            if not default:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            return load(self, default, budget_bytes)
        monkeypatch.setattr(BudgetedLlama, "_load", failing)
        with pytest.raises(BudgetError, match=r"was not applied.*Cannot allocate memory.*open again as before"):
            rt.set_budget(full // 2)
        assert rt.layout == "default" and rt.cache.budget_bytes == full and "open again" in rt.warnings[-1]
        assert [e.token for e in rt.stream_generate(PROMPT, N_TOKENS)] == expected
    finally:
        rt.close()


def _last_logits(llm, prompt: str):
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=False))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).copy()


def test_default_layout_is_plain_llama_cpps_load(tiny_checkpoint, tmp_path):
    """On a q4_k file llama.cpp's CPU repack changes the kernels' sums: the default layout's logits
    equal plain llama.cpp's defaults exactly, the slots layout's those of llama.cpp without repack
    (also after a live budget change reopened the model)."""
    path = convert(tiny_checkpoint("mixtral"), tmp_path / "m.gguf", "q4_k").path
    plain = {}
    for name, params in (("default", None), ("no repack", dict(use_extra_bufts=False))):
        llm = open_llama(path, n_ctx=128, model_params=params)
        plain[name] = _last_logits(llm, PROMPT)
        llm.close()
    assert (plain["default"] != plain["no repack"]).any(), "this file must be one llama.cpp repacks"
    full = budget_range(path)[1]
    for full_layout, layout, reference in ((None, "default", "default"), (False, "slots", "no repack")):
        rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=full, n_ctx=128, full_layout=full_layout))
        try:
            assert rt.layout == layout
            got = _last_logits(rt.llm, PROMPT)
            rt.end_step()
            assert (got == plain[reference]).all(), (layout, abs(got - plain[reference]).max())
            if layout == "default":
                rt.set_budget(full // 2)
                assert rt.layout == "slots"
                got = _last_logits(rt.llm, PROMPT)
                rt.end_step()
                assert (got == plain["no repack"]).all()
        finally:
            rt.close()
    with pytest.raises(InputError, match="full_layout=True needs a budget that holds every expert"):
        BudgetedLlama(path, BudgetedConfig(budget_bytes=full // 2, full_layout=True))


def test_bench_rows_say_which_layout_ran(demo):
    from edgemoe.bench.speed import bench_llama_budget
    from edgemoe.tokenizer import Tokenizer

    path, _ = demo
    ids = Tokenizer(path).encode(PROMPT)
    for full_layout, layout in ((None, "default"), (False, "slots")):
        b = bench_llama_budget(path, ids, 3, 1, "lru", full_layout)
        assert b["layout"] == layout and b["hit_rate"] == 1.0 and b["decode"] > 0


# ---- huge pages through the move (edgemoe/llama_slots.py) ---------------------------------------
@pytest.fixture(scope="module")
def big_parts(tmp_path_factory):
    """Expert matrices of 4 MiB (f16 1024 x 2048): parts that span whole huge pages."""
    from synthetic import write_mixtral

    d = tmp_path_factory.mktemp("slots-huge")
    ckpt = write_mixtral(d / "ckpt", hidden=1024, ff=2048, n_experts=4, n_layers=2, seed=5)
    path = _private_copy(convert(ckpt, d / "m.gguf", "f16").path, d / "private.gguf")
    llm = open_llama(path, n_ctx=256, model_params=dict(use_extra_bufts=False))  # the slots layout's kernels
    try:
        return path, [e.token for e in stream_generate(llm, PROMPT, N_TOKENS)]
    finally:
        llm.close()


@pytest.mark.parametrize("delta", [0, PAGE, 5 * PAGE, (2 << 20) - PAGE])
def test_slot_pieces_cover_each_interior_once_with_middles_congruent_to_their_address(big_parts, delta):
    """For any placement of llama.cpp's mapping (`delta`: its address minus file offset, mod 2 MiB):
    the pieces cover every interior page exactly once, stay inside the slot without overlapping,
    and every middle piece sits where its slot place and its address agree modulo 2 MiB."""
    from edgemoe.dma_buffers import HUGE_PAGE
    from edgemoe.llama_budget import file_geometry
    from edgemoe.llama_slots import slot_pieces

    geometry = file_geometry(GGUFFile(big_parts[0]))[2]
    assert any(mid for g in geometry.values() for _, mid, _, _ in g.regions), "parts span huge pages"
    address = lambda offset: offset + delta  # noqa: E731
    huge_moves = 0
    for g in geometry.values():
        pieces = slot_pieces(g, address)
        covered = sorted((o, o + n) for o, n, _ in pieces)
        assert covered == sorted((a, b) for a, b in covered)
        want = sorted(p for o, n in g.interiors if n for p in range(o, o + n, PAGE))
        assert sorted(p for o, n, _ in pieces for p in range(o, o + n, PAGE)) == want
        places = sorted((pos, pos + n) for _, n, pos in pieces)
        assert all(b <= c for (_, b), (c, _) in zip(places, places[1:])) and places[-1][1] <= g.slot_bytes
        for o, n, pos in pieces:
            if n >= HUGE_PAGE:
                assert pos % HUGE_PAGE == 0 and address(o) % HUGE_PAGE == 0 and n % HUGE_PAGE == 0
                huge_moves += 1
    assert huge_moves >= len(geometry)


def _huge_bytes_in(start: int, end: int) -> int:
    """AnonHugePages of this process's mappings inside [start, end)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = start <= lo and hi <= end
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def test_slots_move_whole_huge_pages_into_llamas_mapping_and_tokens_stay_plain(big_parts):
    """Resident experts' middles are huge pages inside llama.cpp's mapping (where the system
    grants transparent huge pages), the budget holds, and the tokens are plain llama.cpp's."""
    path, expected = big_parts
    rt = BudgetedLlama(path, BudgetedConfig(budget_bytes=int(_expert_total(path) * 0.6), n_ctx=256, full_layout=False))
    try:
        events, checks = _stream_checked(rt)
        assert [e.token for e in events] == expected
        assert all(measured <= rt.config.budget_bytes for measured, _, _ in checks)
        assert sum(e.cache.misses for e in events) > 0 and sum(e.cache.evictions for e in events) > 0
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        if "[never]" in thp:
            pytest.skip("transparent huge pages are off on this system: slots move small pages")
        m = rt.pages.mapping
        assert _huge_bytes_in(m.start, m.end) >= 2 << 20, "middles moved in as huge pages"
    finally:
        rt.close()
