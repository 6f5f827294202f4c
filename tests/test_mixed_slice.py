"""Mixed-precision slices (edgemoe/models/mixed_slice.py): the extended-layout file the engine
opens holds the planned per-expert types within the planned bytes, and the engine's logits match
llama.cpp on the same file with every expert dequantised to f32. Run on a Mixtral-shaped slice
at small dimensions (the same code, seconds); the Qwen3-shaped proxy is checked on its real
16-layer plan without writing it."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import PlannedTensor
from edgemoe.engine import Engine, EngineConfig
from edgemoe.expert_store import find_experts
from edgemoe.gguf_file import GGUFFile
from edgemoe.layout import KEY_MIXED_BUDGET, KEY_MIXED_SOURCE, ROLES, expert_tensor_name, read_layout
from edgemoe.models.mixed_slice import Q3_K_BITS, SOURCE, write_mixed_slice
from edgemoe.models.mixtral_slice import MIXTRAL, slice_spec
from edgemoe.models.slices import tensor_name, write_slice
from oracles import llama_logits

TINY = replace(MIXTRAL, hidden=256, ff=512, n_head=4, n_kv=2, vocab=4096)
PROMPT_IDS = [3 + (37 * i + 11) % 500 for i in range(24)]
# As tests/test_mixed_layout.py: ggml quantises the activations (Q8_K) of the engine's quantised
# expert dot products where llama.cpp here multiplies f32 experts; a router near-tie may flip an
# expert at a position or two.
REL_TOL_POSITION = 3e-2
MAX_NEAR_TIES = 2
REL_TOL_TIE = 0.3
_EXPS = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP}


@pytest.fixture(scope="module")
def tiny_mixed(tmp_path_factory):
    """A 2-layer tiny Mixtral-shaped slice at 4 bits per expert weight: between q3_k's and
    q4_k's bytes, so even equally important experts must take different types."""
    root = tmp_path_factory.mktemp("mixed-slice")
    spec = slice_spec(2, dims=TINY)
    return spec, write_mixed_slice(root / "tiny-mixed.gguf", spec, bits=4.0)


def test_file_holds_the_planned_types_within_the_planned_bytes(tiny_mixed):
    spec, report = tiny_mixed
    f = GGUFFile(report.written.path)
    layout = read_layout(f)
    planned = {key: report.written.types[key] for key in report.allocation.choice}
    assert layout.expert_types == planned
    assert len(set(planned.values())) > 1  # measured: q3_k x 8, q4_k x 8
    assert all(types == (q,) * 3 for types, q in zip(planned.values(), report.allocation.choice.values()))
    specs = find_experts(f)
    assert sum(s.nbytes for s in specs.values()) == report.written.expert_bytes == report.allocation.total_bytes
    n_params = sum(3 * TINY.hidden * TINY.ff for _ in specs)
    assert report.budget_bytes == int(4.0 * n_params / 8) == f.field(KEY_MIXED_BUDGET)
    assert 0.97 * report.budget_bytes <= report.written.expert_bytes <= report.budget_bytes
    assert f.field(KEY_MIXED_SOURCE) == SOURCE and f.field("general.name") == "mixtral-slice-2L"
    # dense tensors as in the stock slice: q4_k rows, f32 norms and routers
    assert f.tensors["blk.0.attn_q.weight"].qtype == QT.Q4_K and f.tensors["token_embd.weight"].qtype == QT.Q4_K
    assert f.tensors[tensor_name(T.FFN_GATE_INP, 1)].qtype == QT.F32


def test_at_q3_k_bits_the_experts_take_q3_k_bytes(tmp_path):
    spec = slice_spec(1, dims=TINY)
    report = write_mixed_slice(tmp_path / "q3.gguf", spec, bits=Q3_K_BITS)
    assert report.budget_bytes == report.q3_k_bytes
    assert 0.97 * report.q3_k_bytes <= report.written.expert_bytes <= report.q3_k_bytes
    stock = write_slice(tmp_path / "stock-q3.gguf", spec, "q3_k")
    assert sum(s.nbytes for s in find_experts(GGUFFile(stock)).values()) == report.q3_k_bytes


def test_engine_matches_llama_cpp_on_the_dequantised_experts(tiny_mixed, tmp_path):
    spec, report = tiny_mixed
    mixed = report.written.path
    reference = write_slice(tmp_path / "dequantised.gguf", replace(spec, plan=lambda _: _dequantised_plan(mixed)),
                            "q4_k")
    engine = Engine(mixed, EngineConfig(n_threads=1, kv_type="f32"))
    try:
        got = engine.logits(PROMPT_IDS)
    finally:
        engine.close()
    want = llama_logits(reference, PROMPT_IDS, n_threads=1, kv="f32", repack=False)
    per_position = np.abs(got - want).max(1) / np.abs(want).max()
    assert (per_position > REL_TOL_POSITION).sum() <= MAX_NEAR_TIES, per_position.round(3)
    assert per_position.max() < REL_TOL_TIE
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def _dequantised_plan(mixed) -> list[PlannedTensor]:
    """The mixed file in the stock layout: dense tensors byte for byte, each layer's experts
    dequantised from their own types to f32 and stacked as 3-D `*_exps` tensors."""
    f = GGUFFile(mixed)
    layout = read_layout(f)
    plan = [PlannedTensor(t.name, t.shape, [lambda t=t: np.asarray(f.data(t.name)).view(np.float32).reshape(t.shape)],
                          keep_f32=True)
            if t.qtype == QT.F32 else  # raw_qtype F32 (= 0) would read as "not raw"
            PlannedTensor(t.name, t.shape, [lambda n=t.name: np.asarray(f.data(n))], raw_qtype=t.qtype)
            for t in f.tensors.values() if not t.is_expert]
    for layer, n in enumerate(layout.expert_counts):
        for r, role in enumerate(ROLES):
            shape = f.tensors[expert_tensor_name(layer, 0, role)].shape

            def part(e: int, layer=layer, role=role, r=r, shape=shape):
                raw = np.asarray(f.data(expert_tensor_name(layer, e, role))).reshape(shape[0], -1)
                return gguf.quants.dequantize(raw, layout.expert_types[(layer, e)][r]).astype(np.float32)
            plan.append(PlannedTensor(tensor_name(_EXPS[role], layer), (n, *shape),
                                      [lambda e=e, part=part: part(e) for e in range(n)], keep_f32=True,
                                      layer=layer, expert_tensor=True))
    return plan


def _decode(path, one_graph: bool, n_prefill: int = 8):
    """Decode-step logits over PROMPT_IDS after a prefill, and the parts the backend computed."""
    import torch

    engine = Engine(path, EngineConfig(n_threads=1, token_graph=one_graph))
    try:
        kv = engine.model.new_kv(len(PROMPT_IDS))
        with torch.no_grad():
            engine.model.forward(PROMPT_IDS[:n_prefill], kv, 0)
            rows = [engine.model.forward([t], kv, i).numpy() for i, t in enumerate(PROMPT_IDS) if i >= n_prefill]
        kv.close()
        return np.concatenate(rows), dict(engine.backend.compute_s)
    finally:
        engine.close()


def test_one_type_per_layer_decodes_as_one_graph(tiny_mixed, tmp_path):
    """--mixed-per layer: each layer's experts take one type (both types used at 4 bits), so with
    every expert resident a decode step runs as one graph, bit-identical to layer by layer; a
    per-expert file whose layers span types cannot (edgemoe/token_graph.py)."""
    spec = slice_spec(2, dims=TINY)
    report = write_mixed_slice(tmp_path / "per-layer.gguf", spec, bits=4.0, types=(QT.Q2_K, QT.Q4_K), per="layer")
    layout = read_layout(GGUFFile(report.written.path))
    per_layer = [{layout.expert_types[(layer, e)] for e in range(TINY.n_expert)} for layer in range(2)]
    assert all(len(types) == 1 for types in per_layer)
    assert {types.pop()[0] for types in per_layer} == {QT.Q2_K, QT.Q4_K}
    assert report.written.expert_bytes <= report.budget_bytes
    got, computed = _decode(report.written.path, one_graph=True)
    want, _ = _decode(report.written.path, one_graph=False)
    assert "token" in computed, "no one-graph decode step ran; the test proves nothing"
    np.testing.assert_array_equal(got, want)

    per_expert = read_layout(GGUFFile(tiny_mixed[1].written.path))
    if any(len({per_expert.expert_types[(layer, e)] for e in range(TINY.n_expert)}) > 1 for layer in range(2)):
        assert "token" not in _decode(tiny_mixed[1].written.path, one_graph=True)[1]


@pytest.mark.slow
def test_qwen3_plan_follows_routing_and_takes_q3_k_bytes(tmp_path):
    """The real 16-layer Qwen3-shaped plan (allocation only, nothing written): the proxy's routing
    frequencies follow the skew the routers were fitted to, hot experts get more bits, and the
    experts take q3_k's bytes."""
    from edgemoe.models.mixed_slice import SliceConverter, _vocab_folder, plan_mixed
    from edgemoe.models.qwen3_slice import TOP_K, slice_spec as qwen3_spec, target_frequencies

    spec = qwen3_spec(16)
    calib, allocation, budget, q3_k = plan_mixed(SliceConverter(spec, "q4_k", _vocab_folder(tmp_path, spec.name)))
    assert budget == q3_k and 0.99 * q3_k <= allocation.total_bytes <= q3_k
    freq = np.array([[calib.experts[(layer, e)].importance for e in range(128)] for layer in range(16)])
    assert np.allclose(freq.sum(1), TOP_K)
    assert np.abs(freq - target_frequencies(16)).max() < 0.06
    bits = {QT.Q2_K: 2, QT.Q3_K: 3, QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6, QT.Q8_0: 8}
    chosen = np.array([[bits[allocation.choice[(layer, e)]] for e in range(128)] for layer in range(16)])
    assert len(np.unique(chosen)) >= 3
    hot, cold = freq > np.quantile(freq, 0.9), freq < np.quantile(freq, 0.1)
    assert chosen[hot].mean() > chosen[cold].mean() + 1


def test_bench_runs_the_engine_and_labels_llama_cpp_skipped(tiny_mixed, tmp_path, capsys):
    from edgemoe.cli import main

    out = tmp_path / "bench.json"
    path = tiny_mixed[1].written.path
    assert main(["bench", str(path), "-n", "2", "--prompt-tokens", "8", "--budgets", "100,50", "--threads", "1",
                 "--json", str(out)]) == 0
    llama, *engine = json.loads(out.read_text())
    assert llama["backend"] == "llama.cpp" and llama["skipped"].startswith("skipped: edgemoe extended layout")
    assert [r["budget_share"] for r in engine] == [1.0, 0.5]
    assert all(r["decode_tps"] > 0 and r["ratio_vs_llama"] is None and not r["skipped"] for r in engine)
    printed = capsys.readouterr().out
    assert "llama.cpp cannot load" in printed and "n/a" in printed


def test_capped_bench_skips_every_llama_cpp_run_of_an_extended_file(tiny_mixed, tmp_path):
    from test_bench_capped import _cgroups_or_skip

    from edgemoe.bench.capped import PLAIN_LLAMA, RUN_NAMES, CappedOptions, run_capped
    from edgemoe.bench.capped_report import model_header, results_table
    from edgemoe.commands.measure import _bench_prompt

    _cgroups_or_skip()
    model = tmp_path / "mixed.gguf"  # a private copy: no other process maps it
    shutil.copy(tiny_mixed[1].written.path, model)
    (report,) = run_capped([model], CappedOptions(2 * 2**30, _bench_prompt(8), n_tokens=2, n_threads=1, n_ctx=96))
    by_name = {r.name: r for r in report.results}
    assert list(by_name) == list(RUN_NAMES)
    for name in (*PLAIN_LLAMA, "llama-budget"):
        assert by_name[name].status == "skipped" and "llama.cpp cannot load" in by_name[name].detail
        assert by_name[name].usage is None  # never started
    assert by_name["edgemoe"].status == "ok" and by_name["edgemoe"].decode_tps > 0
    assert report.reference is None and "no llama.cpp compute reference" in report.reference_note
    assert report.best_plain_llama() is None and report.ratio(by_name["edgemoe"]) is None
    assert "no llama.cpp compute reference" in model_header(report, 2 * 2**30)
    assert results_table(report).row_count == len(RUN_NAMES)
