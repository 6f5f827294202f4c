"""A MoE-I² compressed model (pruned experts + low-rank experts) written in the extended layout
(version 2) runs in the engine, and its logits match transformers running the same compressed
model: dropped experts masked out of the router (moe_view.dropped: logit -inf is the same as a
removed row) and each low-rank matrix replaced by a @ b. Also: what the writer refuses, what the
reader refuses before native code, the cache budget on such a file, and `inspect`."""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch

from edgemoe.cli import main as cli_main
from edgemoe.converters.compress.export import CompressedModel, export_compressed
from edgemoe.converters.compress.lowrank import Factors, apply_factors, svd_factors
from edgemoe.converters.compress.moe_view import dropped, moe_layers
from edgemoe.converters.errors import ConvertError
from edgemoe.engine import Engine, EngineConfig
from edgemoe.expert_store import LowRank, find_experts, read_expert
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.inspect_model import summarize
from edgemoe.layout import KEY_COMPRESS_REPORT, KEY_COUNTS, KEY_IDS, KEY_RANKS, KEY_VERSION, read_layout
from edgemoe.models import demo_dir
from oracles import rel_max_diff, top1_agreement

PROMPT_IDS = [3 + (37 * i + 11) % 500 for i in range(32)]
# max|diff| / max|logit|, engine vs the compressed reference, measured: f32 4.5e-7 (demo),
# 7.0e-7 (qwen2moe), 5.9e-7 (qwen3moe); q8_0 (dense and experts) against the f32 reference
# 5.4e-3 (demo), 6.2e-2 (qwen3moe), top-1 1.0. Sensitivity: the same engine logits against a
# reference without the low-rank replacement differ by 1.7e-2 .. 4.2e-1, without the pruning
# by 4.7e-1 .. 5.5e-1.
REL_TOL_F32 = 1e-5
REL_TOL_Q8 = 0.1
MIN_TOP1_Q8 = 0.9
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (layer -> kept ids) and (layer, original id, role) -> rank. The demo model (Mixtral arch, 4
# layers x 8 experts, top-2, D 256, F 512): uneven pruning down to top-k in layer 3, low-rank
# experts with all roles, one role, two roles; ranks that are and are not multiples of 32.
PLANS = {
    "demo": ({0: [0, 2, 3, 5, 6, 7], 2: [1, 2, 4, 7], 3: [3, 6]},
             {(0, 2, "gate"): 64, (0, 2, "up"): 64, (0, 2, "down"): 96, (1, 5, "gate"): 20,
              (2, 4, "up"): 32, (2, 4, "down"): 40, (3, 6, "down"): 128}),
    # the tiny checkpoints: 3 layers x 8 experts, top-2, D = F = 256
    "qwen2moe": ({0: [1, 2, 3, 4, 5, 6], 2: [0, 5, 7]},
                 {(0, 3, "gate"): 32, (0, 3, "up"): 32, (0, 3, "down"): 32, (1, 0, "up"): 12, (2, 7, "down"): 64}),
    "qwen3moe": ({1: [0, 1, 2, 3], 2: [2, 4, 6, 7]},
                 {(0, 1, "gate"): 48, (1, 2, "down"): 24, (2, 6, "gate"): 16, (2, 6, "up"): 16,
                  (2, 6, "down"): 16}),
}


def _hf_dir(tiny_checkpoint, name: str):
    return demo_dir() if name == "demo" else tiny_checkpoint(name)


def _load(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _matrix(layer, e: int, role: str) -> torch.Tensor:
    gate, up = layer.gate_up[e].chunk(2, dim=0)
    return {"gate": gate, "up": up, "down": layer.down[e]}[role]


def compressed_model(hf_dir, kept, ranks) -> CompressedModel:
    """SVD factors of the checkpoint's own matrices at the given ranks."""
    layers = {l.index: l for l in moe_layers(_load(hf_dir))}
    low_rank = {(li, e, role): svd_factors(_matrix(layers[li], e, role).detach(), r)
                for (li, e, role), r in ranks.items()}
    report = {"method": "test", "ranks": len(ranks), "importance": {(0, 1): torch.tensor([0.5])}}
    return CompressedModel(kept=kept, low_rank=low_rank, report=report)


def reference_logits(hf_dir, cm: CompressedModel, ids) -> np.ndarray:
    """transformers on the same compressed model: low-rank matrices replaced by a @ b (experts with
    all three roles through lowrank.apply_factors), pruned experts masked out of the router."""
    model = _load(hf_dir)
    layers = {l.index: l for l in moe_layers(model)}
    by_expert: dict[tuple[int, int], dict[str, Factors]] = {}
    for (li, e, role), f in cm.low_rank.items():
        by_expert.setdefault((li, e), {})[role] = f
    with torch.no_grad():
        for (li, e), fs in by_expert.items():
            if len(fs) == 3:
                apply_factors(layers[li], {e: fs})
            else:
                for role, f in fs.items():
                    _matrix(layers[li], e, role).copy_(f.weight())
    drops = {li: tuple(sorted(set(range(layers[li].n_experts)) - set(ids_))) for li, ids_ in cm.kept.items()}
    with dropped(list(layers.values()), drops), torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def engine_logits(path, **config) -> np.ndarray:
    engine = Engine(path, EngineConfig(n_threads=1, **config))
    try:
        return engine.logits(PROMPT_IDS)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """(name, expert type) -> (hf dir, CompressedModel, GGUF path); each written once."""
    root = tmp_path_factory.mktemp("compressed")
    models = functools.cache(lambda name: compressed_model(_hf_dir(tiny_checkpoint, name), *PLANS[name]))

    @functools.cache
    def build(name: str, expert_type: str = "f32"):
        hf, cm = _hf_dir(tiny_checkpoint, name), models(name)
        dense = "f32" if expert_type == "f32" else "q8_0"
        out = export_compressed(hf, root / f"{name}-{expert_type}.gguf", cm, dense_type=dense, expert_type=expert_type)
        return hf, cm, out
    return build


@pytest.mark.parametrize("name", ["demo", "qwen2moe", "qwen3moe"])
def test_engine_matches_the_compressed_reference_f32(exported, name):
    hf, cm, path = exported(name)
    got, want = engine_logits(path, kv_type="f32"), reference_logits(hf, cm, PROMPT_IDS)  # f32 attention, as torch's
    assert rel_max_diff(got, want) < REL_TOL_F32


@pytest.mark.parametrize("name", ["demo", "qwen3moe"])
def test_engine_matches_the_compressed_reference_q8_0(exported, name):
    hf, cm, path = exported(name, "q8_0")
    got, want = engine_logits(path), reference_logits(hf, cm, PROMPT_IDS)
    assert rel_max_diff(got, want) < REL_TOL_Q8
    assert top1_agreement(got, want) >= MIN_TOP1_Q8


def test_layout_tables_router_rows_and_one_pread_per_expert(exported, monkeypatch):
    hf, cm, path = exported("demo", "q8_0")
    f = GGUFFile(path)
    kept, ranks = PLANS["demo"]
    assert f.field(KEY_VERSION) == 2 and int(f.arch_field("expert_count")) == 8
    assert list(f.field(KEY_COUNTS)) == [6, 8, 4, 2]
    assert list(f.field(KEY_IDS)) == kept[0] + list(range(8)) + kept[2] + kept[3]
    assert json.loads(f.field(KEY_COMPRESS_REPORT)) == {"method": "test", "ranks": 7, "importance": {"0,1": [0.5]}}
    layout = read_layout(f)
    assert layout.expert_ids[2] == (1, 2, 4, 7)
    for layer, n in enumerate(layout.expert_counts):
        assert f.tensors[f"blk.{layer}.ffn_gate_inp.weight"].shape == (n, 256)  # router rows = stored experts
    # ranks are stored by stored index; expert 4 of layer 2 is index 2 there
    assert layout.expert_ranks[(2, 2)] == (0, 32, 40) and layout.expert_ranks[(0, 1)] == (64, 64, 96)
    assert sum(1 for r in layout.expert_ranks.values() for x in r if x) == len(ranks)
    specs = find_experts(f)
    spec = specs[(0, 1)]  # layer 0, original expert 2: all three roles low-rank
    assert [p.role for p in spec.parts] == ["gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"]
    assert spec.contiguous and spec.nbytes < specs[(0, 0)].nbytes
    # q8_0 rows where they fit; a b factor of rank 20 falls back (rows of 20 values)
    b20 = f.tensors["blk.1.expert.5.ffn_gate_b.weight"]
    assert b20.shape == (512, 20) and b20.qtype.name == "F16"
    assert f.tensors["blk.1.expert.5.ffn_gate_a.weight"].qtype.name == "Q8_0"
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(off) or real(fd, bufs, off))
    fd = os.open(path, os.O_RDONLY)
    try:
        expert = read_expert(fd, spec, f.size)
    finally:
        os.close(fd)
    assert calls == [spec.parts[0].offset]
    assert isinstance(expert.matrices["gate"], LowRank) and expert.matrices["down"].rows == 256
    expert.close()


def test_pruning_below_top_k_and_bad_factors_are_refused_on_write(tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint("qwen3moe")
    out = tmp_path / "x.gguf"
    with pytest.raises(ConvertError, match="keeps 1 experts, fewer than the 2"):
        export_compressed(hf, out, CompressedModel(kept={1: [3]}, low_rank={}))
    bad = Factors(torch.zeros(256, 8), torch.zeros(8, 128))
    with pytest.raises(ConvertError, match="does not give the matrix"):
        export_compressed(hf, out, CompressedModel(kept={}, low_rank={(0, 1, "up"): bad}))
    ok = Factors(torch.zeros(256, 8), torch.zeros(8, 256))
    with pytest.raises(ConvertError, match="pruned or does not exist"):
        export_compressed(hf, out, CompressedModel(kept={0: [0, 2]}, low_rank={(0, 1, "up"): ok}))
    with pytest.raises(ConvertError, match="ascending"):
        export_compressed(hf, out, CompressedModel(kept={0: [2, 0]}, low_rank={}))
    with pytest.raises(ConvertError, match="shape"):
        export_compressed(hf, out, CompressedModel(kept={}, low_rank={},
                                                   overrides={"model.embed_tokens.weight": torch.zeros(3, 3)}))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_overrides_replace_checkpoint_tensors(tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint("qwen3moe")
    model = _load(hf)
    name = "model.layers.1.self_attn.o_proj.weight"
    new = model.state_dict()[name] * 0.5
    cm = CompressedModel(kept={2: [0, 1, 5]}, low_rank={}, overrides={name: new})
    calls = []
    path = export_compressed(hf, tmp_path / "o.gguf", cm, dense_type="f32", expert_type="f32",
                             progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls[-1][0] == calls[-1][1] > 0  # bytes written so far, of all
    assert any(".expert." in name for _, _, name in calls)
    with torch.no_grad():
        model.get_parameter(name).copy_(new)
    model.save_pretrained(tmp_path / "hf")
    for f in hf.iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / "hf" / f.name).write_bytes(f.read_bytes())
    got = engine_logits(path, kv_type="f32")
    assert rel_max_diff(got, reference_logits(tmp_path / "hf", cm, PROMPT_IDS)) < REL_TOL_F32


def _patch_u32_array(path, key: str, index: int, value: int) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields[key]
    part = field.parts[field.data[index]]
    offset = part.ctypes.data - reader.data.ctypes.data
    del reader
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.uint32(value).tobytes())


def _rename_tensor(path, old: str, new: str) -> None:
    assert len(old) == len(new)
    data = bytearray(path.read_bytes())
    at = data.index(old.encode())
    data[at:at + len(old)] = new.encode()
    path.write_bytes(bytes(data))


def test_corrupt_rank_tables_and_factors_are_model_file_errors(exported, tmp_path):
    from edgemoe.converters.arch import converter_for
    from edgemoe.converters.extended import FactorPair, write_extended
    from edgemoe.converters.hf_checkpoint import HFCheckpoint
    from gguf import GGMLQuantizationType as QT

    _, _, path = exported("demo")
    layout = read_layout(GGUFFile(path))
    first = next(i for i, r in enumerate(r for k in sorted(layout.expert_ranks) for r in layout.expert_ranks[k]) if r)
    cases = {"rank": (KEY_RANKS, first, 63, "do not have the rank 63"),
             "zero": (KEY_RANKS, first, 0, "is stored in full|is missing")}
    for case, (key, index, value, message) in cases.items():
        bad = tmp_path / f"{case}.gguf"
        bad.write_bytes(path.read_bytes())
        _patch_u32_array(bad, key, index, value)
        with pytest.raises(ModelFileError, match=message):
            Engine(bad)
    missing = tmp_path / "missing.gguf"
    missing.write_bytes(path.read_bytes())
    _rename_tensor(missing, "blk.0.expert.1.ffn_up_b.weight", "blk.0.expert.1.ffn_up_x.weight")
    with pytest.raises(ModelFileError, match="low-rank factor blk.0.expert.1.ffn_up_b.weight is missing"):
        Engine(missing)
    top3 = tmp_path / "top3.gguf"  # layer 3 keeps 2 experts: too few for top-3
    top3.write_bytes(path.read_bytes())
    _patch_u32_array(top3, "llama.expert_used_count", 0, 3)
    with pytest.raises(ModelFileError, match="layer 3 stores 2 experts, fewer than the 3"):
        Engine(top3)
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(path.read_bytes())
    _patch_u32_array(v1, KEY_VERSION, 0, 1)
    with pytest.raises(ModelFileError, match="version 1 does not define"):
        find_experts(GGUFFile(v1))

    # factors inconsistent with the layer, written through the low-level writer (export checks them)
    conv = converter_for(HFCheckpoint(demo_dir()))
    types = {(l, e): QT.F32 for l in range(4) for e in range(8)}
    for case, pair, message in [
            ("rank-mismatch", FactorPair(np.zeros((8, 256), np.float32), np.zeros((512, 9), np.float32)),
             "do not have the rank 8"),
            ("layer-shape", FactorPair(np.zeros((8, 256), np.float32), np.zeros((256, 8), np.float32)),
             r"gate is \[256, 256\].*expected \[512, 256\]")]:
        out = tmp_path / f"{case}.gguf"
        write_extended(conv, out, "f32", types, factors={(1, 3, "gate"): pair})
        with pytest.raises(ModelFileError, match=message):
            Engine(out)


def test_budget_is_a_hard_limit_on_a_compressed_file(exported):
    _, _, path = exported("demo", "q8_0")
    full = Engine(path, EngineConfig(n_threads=1))
    want = full.logits(PROMPT_IDS)
    largest = max(s.alloc_bytes for s in full.specs.values())
    budget = max(int(0.25 * full.expert_bytes_total), largest)
    assert full.expert_bytes_total == sum(s.alloc_bytes for s in find_experts(GGUFFile(path)).values())
    full.close()
    engine = Engine(path, EngineConfig(n_threads=1, budget_bytes=budget, policy="lru", prefetch=True))
    try:
        np.testing.assert_array_equal(engine.logits(PROMPT_IDS), want)
        events = list(engine.stream_generate(PROMPT_IDS[:8], max_tokens=12, stop_at_eos=False))
        assert all(e.cache.resident_bytes <= budget for e in events)
        assert engine.cache.state.peak_bytes <= budget
        assert sum(e.cache.misses for e in events) > 0
    finally:
        engine.close()


def test_dual_precision_runs_low_rank_experts(exported):
    _, _, path = exported("demo", "q8_0")
    want = engine_logits(path)
    engine = Engine(path, EngineConfig(n_threads=1, dual_low_type="q4_0", dual_load_above=1.0,
                                       budget_bytes=None))
    try:
        low = engine.cache.low.experts[(0, 1)]  # all three roles low-rank
        assert isinstance(low.matrices["gate"], LowRank)
        got = engine.logits(PROMPT_IDS)
    finally:
        engine.close()
    assert top1_agreement(got, want) >= 0.8


def test_stock_llama_refuses_and_inspect_shows_counts_and_ranks(exported, capsys):
    from edgemoe.llama_backend import open_llama

    _, _, path = exported("demo", "q8_0")
    with pytest.raises(ModelFileError, match="stock llama.cpp cannot load"):
        open_llama(path)
    s = summarize(GGUFFile(path))
    assert s.layout == "extended v2" and s.experts_per_layer == (6, 8, 4, 2) and s.original_experts == 8
    assert s.layer_ranks[0] == (64, 64, 96) and s.layer_ranks[3] == (128,) and s.layer_ranks[1] == (20,)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "6 of 8" in out and "2 of 8" in out and "low-rank" in out


def test_trace_simulator_and_predictors_on_a_pruned_file(exported, tmp_path):
    """Traces of a pruned file replay exactly in the simulator; a learned predictor trained on
    its own traces is used, one trained on the unpruned model is refused (ids mean other experts)."""
    from edgemoe.demo import demo_gguf
    from edgemoe.predictor.train import train
    from edgemoe.simulate import simulate
    from edgemoe.trace import Trace, TraceRecorder

    def record(model_path, out, budget_share=None):
        probe = Engine(model_path, EngineConfig(n_threads=1))
        budget = max(int(probe.expert_bytes_total * budget_share), max(s.alloc_bytes for s in probe.specs.values())) \
            if budget_share else None
        probe.close()
        engine = Engine(model_path, EngineConfig(n_threads=1, budget_bytes=budget, policy="lru"))
        rec = TraceRecorder(engine)
        events = list(engine.stream_generate(PROMPT_IDS[:8], max_tokens=40, stop_at_eos=False))
        trace = rec.detach()
        engine.close()
        trace.save(out)
        return Trace.load(out), events, budget

    _, _, path = exported("demo", "q8_0")
    trace, events, budget = record(path, tmp_path / "c.json", 0.3)
    assert {e for step in trace.steps for tok in step.get(3, []) for e in tok} == {0, 1}  # layer 3 keeps 2
    sim = simulate(trace, budget, "lru", decode_only=False)
    assert (sim.hits, sim.misses) == (sum(e.cache.hits for e in events), sum(e.cache.misses for e in events))
    train([tmp_path / "c.json"], tmp_path / "own.onnx", epochs=1, hidden=8)
    record(demo_gguf("q8_0"), tmp_path / "o.json")
    train([tmp_path / "o.json"], tmp_path / "orig.onnx", epochs=1, hidden=8)
    for onnx, refused in (("own.onnx", False), ("orig.onnx", True)):
        engine = Engine(path, EngineConfig(n_threads=1, prefetch=True, predictor="learned",
                                           predictor_path=str(tmp_path / onnx)))
        try:
            assert any("pruned layers" in w for w in engine.warnings) == refused, engine.warnings
            list(engine.stream_generate(PROMPT_IDS[:4], max_tokens=4, stop_at_eos=False))
        finally:
            engine.close()
