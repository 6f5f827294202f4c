"""Old per-expert Mixtral GGUFs (blk.N.ffn_gate.E.weight, llama.cpp's converters before April
2024): written here with gguf-py from the tiny Mixtral conversion, in the per-expert order the old
converter used. llama.cpp 0.3.36 refuses them; edgemoe names the layout and the command, and
`upgrade` rewrites them byte for byte into the current layout, which llama.cpp and the engine run
with the logits of the original conversion."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.gguf_rewrite import TensorSource, rewrite, same_tensors
from edgemoe.legacy import upgrade
from oracles import llama_logits

PROMPT_IDS = [1, 17, 250, 33, 402, 9, 77, 5]
_MERGED = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")


def write_per_expert(stock: Path, out: Path, interleave: bool) -> Path:
    """`stock` with every 3-D expert tensor split into one 2-D tensor per expert (legacy names,
    which gguf-py no longer has); `interleave`: expert by expert (gate, down, up), as the old
    converter wrote them, else role by role in the stock tensor's place."""
    model = GGUFFile(stock)
    tensors, by_layer = [], {}
    for t in same_tensors(model):
        m = _MERGED.fullmatch(t.name)
        if not m:
            tensors.append(t)
            continue
        per = t.nbytes // t.shape[0]
        split = [TensorSource(f"blk.{m[1]}.ffn_{m[2]}.{e}.weight", t.shape[1:], t.qtype,
                              ((t.pieces[0][0] + e * per, per),)) for e in range(t.shape[0])]
        if interleave:
            by_layer.setdefault(int(m[1]), {})[m[2]] = split
        else:
            tensors += split
    for roles in by_layer.values():
        for e in range(len(roles["gate"])):
            tensors += [roles[r][e] for r in ("gate", "down", "up")]
    rewrite(model, out, tensors)
    return out


@pytest.fixture(scope="module")
def stock(tiny_checkpoint, tmp_path_factory):
    from edgemoe.converters.convert import convert

    return convert(tiny_checkpoint("mixtral"), tmp_path_factory.mktemp("legacy") / "stock.gguf", "q8_0").path


def test_rewrite_with_the_same_tensors_reproduces_the_file(stock, tmp_path):
    out = tmp_path / "same.gguf"
    rewrite(GGUFFile(stock), out, same_tensors(GGUFFile(stock)))
    assert out.read_bytes() == stock.read_bytes()


def test_llama_cpp_no_longer_loads_per_expert_files(stock, tmp_path):
    legacy = write_per_expert(stock, tmp_path / "old.gguf", interleave=True)
    from llama_cpp import Llama

    with pytest.raises(ValueError):  # llama-cpp-python's "Failed to load model from file"
        Llama(str(legacy), vocab_only=False, verbose=False)


@pytest.mark.parametrize("opener", ["engine", "llama"])
def test_per_expert_files_get_what_they_are_and_the_command(stock, tmp_path, opener):
    legacy = write_per_expert(stock, tmp_path / "old.gguf", interleave=True)
    with pytest.raises(ModelFileError, match=r"one tensor per expert .*before April 2024.*edgemoe upgrade "):
        if opener == "engine":
            from edgemoe.engine import Engine

            Engine(legacy)
        else:
            from edgemoe.llama_backend import open_llama

            open_llama(legacy)


def test_upgrade_in_place_order_gives_back_the_original_bytes(stock, tmp_path):
    legacy = write_per_expert(stock, tmp_path / "old.gguf", interleave=False)
    assert upgrade(legacy, tmp_path / "new.gguf") == 3 * 3  # 3 layers x gate/up/down
    assert (tmp_path / "new.gguf").read_bytes() == stock.read_bytes()


def test_upgraded_interleaved_file_runs_like_the_original(stock, tmp_path):
    from edgemoe.engine import Engine, EngineConfig

    new = tmp_path / "new.gguf"
    upgrade(write_per_expert(stock, tmp_path / "old.gguf", interleave=True), new)
    a, b = GGUFFile(new), GGUFFile(stock)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in b.tensors:
        assert np.array_equal(a.data(name), b.data(name)), name
    np.testing.assert_array_equal(llama_logits(new, PROMPT_IDS), llama_logits(stock, PROMPT_IDS))
    engine = Engine(new, EngineConfig(n_threads=1))
    try:
        assert len(engine.specs) == 3 * 8
    finally:
        engine.close()


def test_upgrade_refuses_current_and_inconsistent_files(stock, tmp_path):
    with pytest.raises(ModelFileError, match="nothing to upgrade"):
        upgrade(stock, tmp_path / "x.gguf")
    model = GGUFFile(legacy := write_per_expert(stock, tmp_path / "old.gguf", interleave=True))
    missing = [t for t in same_tensors(model) if t.name != "blk.1.ffn_up.5.weight"]
    rewrite(model, tmp_path / "gap.gguf", missing)
    with pytest.raises(ModelFileError, match=r"layer 1 has up tensors for experts \[0, 1, 2, 3, 4, 6, 7\]"):
        upgrade(tmp_path / "gap.gguf", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and legacy.exists()


def test_upgrade_command(stock, tmp_path, capsys):
    from edgemoe.cli import main

    legacy = write_per_expert(stock, tmp_path / "old.gguf", interleave=True)
    assert main(["upgrade", str(legacy), "-o", str(tmp_path / "new.gguf")]) == 0
    assert "9 per-expert tensor groups merged" in " ".join(capsys.readouterr().err.split())  # rich wraps
    assert main(["inspect", str(tmp_path / "new.gguf")]) == 0
    assert main(["inspect", str(legacy)]) == 2
    assert "edgemoe upgrade" in capsys.readouterr().err
