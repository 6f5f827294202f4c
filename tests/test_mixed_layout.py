"""`edgemoe convert --mixed` writes the extended layout; the engine runs it and its logits match
transformers running the same checkpoint with every expert replaced by the file's dequantised
bytes (each in its own type); stock llama.cpp refuses it; `inspect` says so."""
from __future__ import annotations

import functools
import os

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from edgemoe.cli import main as cli_main
from edgemoe.converters.calibration import calibrate
from edgemoe.converters.mixed import convert_mixed
from edgemoe.engine import Engine, EngineConfig
from edgemoe.expert_store import find_experts, read_expert
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.inspect_model import summarize
from edgemoe.layout import KEY_COUNTS, KEY_IDS, KEY_TYPES, KEY_VERSION, expert_tensor_name, read_layout
from oracles import rel_max_diff, top1_agreement

PROMPT_IDS = [3 + (37 * i + 11) % 500 for i in range(32)]
# Per position max|diff| / max|logit|, engine vs transformers on the dequantised experts. With
# experts in f32 the two agree to 6e-7. Quantised, ggml quantises the activations of quantised
# dot products (Q8_K) where the reference multiplies in f32: 4e-3 .. 2e-2 per position, and at
# one position in 32 a router near-tie flips an expert (measured up to 9e-2 mixed, 7e-2 even with
# every expert q8_0, 1.8e-1 all q2_k). Reading an expert's bytes as another type or another
# expert's gives ~1 at most positions.
REL_TOL_F32 = 1e-5
REL_TOL_POSITION = 3e-2
MAX_NEAR_TIES = 2  # positions of 32 allowed above REL_TOL_POSITION (never above REL_TOL_TIE)
REL_TOL_TIE = 0.3
ARCHS = ["mixtral", "qwen2moe"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixed(tiny_checkpoint, tmp_path_factory):
    """(arch, uniform type or None) -> (checkpoint folder, extended GGUF with dense f32, report);
    one calibration per arch."""
    root = tmp_path_factory.mktemp("mixed")
    calibration = functools.cache(lambda arch: calibrate(tiny_checkpoint(arch), n_tokens=512, n_threads=1))

    @functools.cache
    def build(arch: str, uniform: str | None = None):
        ckpt = tiny_checkpoint(arch)
        out = root / f"{arch}-{uniform or 'mixed'}.gguf"
        budget = dict(uniform_type=uniform) if uniform else dict(avg_bits=4.0)
        return ckpt, out, convert_mixed(ckpt, out, dense_type="f32", calibration=calibration(arch), **budget)
    return build


def _dequantised_reference_logits(ckpt, path, ids) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    f = GGUFFile(path)
    for (layer, e), spec in find_experts(f).items():
        w = {}
        for p in spec.parts:
            raw = np.asarray(f.data(expert_tensor_name(layer, e, p.role))).reshape(p.rows, -1)
            w[p.role] = torch.from_numpy(np.array(gguf.quants.dequantize(raw, p.qtype), dtype=np.float32))
        experts = model.model.layers[layer].mlp.experts  # transformers' fused [E, 2F, D] / [E, D, F]
        experts.gate_up_proj.data[e] = torch.cat([w["gate"], w["up"]])
        experts.down_proj.data[e] = w["down"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _engine_logits(path, kv: str = "f16") -> np.ndarray:
    engine = Engine(path, EngineConfig(n_threads=1, kv_type=kv))
    try:
        return engine.logits(PROMPT_IDS)
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_dequantised_reference_of_the_per_expert_types(mixed, arch):
    ckpt, path, report = mixed(arch)
    assert len(set(report.written.types.values())) > 1, "the allocation should mix types"
    got = _engine_logits(path)
    want = _dequantised_reference_logits(ckpt, path, PROMPT_IDS)
    per_position = np.abs(got - want).max(1) / np.abs(want).max()
    assert (per_position > REL_TOL_POSITION).sum() <= MAX_NEAR_TIES, per_position.round(3)
    assert per_position.max() < REL_TOL_TIE
    assert top1_agreement(got, want) >= 0.95


def test_extended_layout_with_f32_experts_is_exact(mixed):
    ckpt, path, _ = mixed("mixtral", "f32")
    # an f32 KV cache: the default f16 one alone costs ~7e-4 against transformers' f32 attention
    got = _engine_logits(path, "f32")
    assert rel_max_diff(got, _dequantised_reference_logits(ckpt, path, PROMPT_IDS)) < REL_TOL_F32


@pytest.mark.parametrize("arch", ["mixtral", "qwen3moe"])
def test_decode_steps_over_several_arenas_match_the_prefill(mixed, arch):
    """Decode steps whose experts span arenas run one compute per arena, then the sum
    (MoEBlock._compute_per_arena); a prefill runs them in one graph. With an f32 KV cache both
    give the same logits (the decode path's own test: tests/test_engine_archs.py)."""
    _, path, _ = mixed(arch)
    engine = Engine(path, EngineConfig(n_threads=1, kv_type="f32"))
    try:
        want = engine.logits(PROMPT_IDS)
        kv, n = engine.model.new_kv(len(PROMPT_IDS)), len(PROMPT_IDS) // 2
        with torch.no_grad():
            rows = [engine.model.forward(PROMPT_IDS[:n], kv, 0, all_logits=True).numpy()]
            rows += [engine.model.forward([t], kv, i).numpy() for i, t in enumerate(PROMPT_IDS) if i >= n]
        kv.close()
        shared = [key for key in engine.model._runner.decode_acts.graphs if key[0] == "pairs"]
    finally:
        engine.close()
    assert shared, "no decode step spanned arenas; the test proves nothing"
    assert rel_max_diff(np.concatenate(rows), want) < 1e-4


def test_layout_keys_types_and_one_pread_per_expert(mixed, monkeypatch):
    _, path, report = mixed("mixtral")
    f = GGUFFile(path)
    assert f.field(KEY_VERSION) == 1  # uncompressed: version 1, which older edgemoe reads too
    assert list(f.field(KEY_COUNTS)) == [8, 8, 8]
    assert list(f.field(KEY_IDS)) == list(range(8)) * 3  # identity until experts are pruned
    assert len(f.field(KEY_TYPES)) == 3 * 24
    assert not any("_exps" in name for name in f.tensors)
    assert f.arch == "llama" and "blk.0.attn_q.weight" in f.tensors  # dense tensors as in the stock layout
    layout = read_layout(f)
    specs = find_experts(f)
    order = sorted(specs.values(), key=lambda s: s.parts[0].offset)
    assert [s.key for s in order] == sorted(specs)  # expert after expert, in (layer, index) order
    for spec in specs.values():
        assert spec.contiguous and tuple(p.qtype for p in spec.parts) == layout.expert_types[spec.key]
        assert tuple(p.qtype for p in spec.parts) == report.written.types[spec.key]
        assert spec.parts[0].offset < spec.parts[1].offset < spec.parts[2].offset
    assert report.written.expert_bytes == sum(s.nbytes for s in specs.values())
    assert report.written.expert_bytes <= report.budget_bytes

    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(off) or real(fd, bufs, off))
    fd = os.open(path, os.O_RDONLY)
    try:
        spec = specs[(1, 3)]
        expert = read_expert(fd, spec, f.size)
    finally:
        os.close(fd)
    assert calls == [spec.parts[0].offset]
    for p in spec.parts:  # each matrix's bytes land where the weights read them
        assert np.array_equal(expert.weights[p.role].data, np.asarray(f.data(expert_tensor_name(1, 3, p.role))))
    expert.close()


def test_stock_llama_refuses_and_inspect_says_why(mixed, capsys):
    from edgemoe.llama_backend import open_llama

    _, path, _ = mixed("mixtral")
    with pytest.raises(ModelFileError, match="extended layout.*stock llama.cpp cannot load"):
        open_llama(path)
    s = summarize(GGUFFile(path))
    assert not s.stock_loadable and "stock llama.cpp cannot load" in s.stock_reason
    assert s.layout == "extended v1" and s.experts_per_layer == (8, 8, 8)
    assert [sum(t.values()) for t in s.layer_types] == [8, 8, 8]
    assert sum(s.layer_expert_bytes) == s.expert_bytes
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stock llama.cpp: no" in out and "expert types" in out


def test_cli_convert_mixed_and_its_errors(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("mixtral")
    text = tmp_path / "cal.txt"
    text.write_text("Return the number of items in a container. " * 40)
    out = tmp_path / "m.gguf"
    assert cli_main(["convert", str(ckpt), "-o", str(out), "--mixed", "--avg-bits", "3.5",
                     "--calibration", str(text), "--calibration-tokens", "256"]) == 0
    err = capsys.readouterr().err
    assert "not loadable by stock llama.cpp" in err and "expert types" in err
    assert read_layout(GGUFFile(out)).n_experts == 24

    per_layer = tmp_path / "per-layer.gguf"
    assert cli_main(["convert", str(ckpt), "-o", str(per_layer), "--mixed", "--avg-bits", "3.5", "--calibration",
                     str(text), "--calibration-tokens", "256", "--mixed-types", "q2_k,q4_k", "--mixed-per", "layer"]) == 0
    layout = read_layout(GGUFFile(per_layer))
    for layer, n in enumerate(layout.expert_counts):
        chosen = {layout.expert_types[(layer, e)] for e in range(n)}
        assert len(chosen) == 1 and chosen.pop()[0] in (QT.Q2_K, QT.Q4_K, QT.Q4_0, QT.Q5_0)  # or their fallbacks
    capsys.readouterr()
    assert cli_main(["convert", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--mixed-per", "layer"]) == 2
    assert "need --mixed" in capsys.readouterr().err
    assert cli_main(["convert", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--mixed", "--avg-bits", "3",
                     "--mixed-types", "q4_1"]) == 2
    assert "unknown expert type 'q4_1'" in capsys.readouterr().err

    assert cli_main(["convert", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--mixed", "--avg-bits", "2"]) == 2
    assert "below the minimum" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(["convert", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--mixed", "--avg-bits", "3",
                     "--calibration", str(empty)]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
