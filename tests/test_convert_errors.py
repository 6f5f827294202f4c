"""Bad input to `edgemoe convert`: each case is a clear error and leaves no .gguf behind."""
from __future__ import annotations

import json
import shutil

import pytest

from edgemoe.cli import main
from edgemoe.converters.convert import convert
from edgemoe.converters.errors import ConvertError
from synthetic import write_mixtral


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    return write_mixtral(tmp_path_factory.mktemp("ckpt") / "mix")


def _ggufs(folder):
    return sorted(p.name for p in folder.iterdir() if ".gguf" in p.name)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(good_ckpt, tmp_path, capsys):
    ckpt = _copy(good_ckpt, tmp_path / "c")
    (ckpt / "config.json").unlink()
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "out.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert _ggufs(tmp_path) == []


def test_unsupported_architecture_names_it_and_lists_supported(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"GPTNeoXForCausalLM.*not supported.*MixtralForCausalLM"):
        convert(ckpt, tmp_path / "out.gguf")
    assert _ggufs(tmp_path) == []


def test_truncated_safetensors(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path / "c")
    shard = ckpt / "model-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ConvertError, match="truncated"):
        convert(ckpt, tmp_path / "out.gguf")
    assert _ggufs(tmp_path) == []


def test_corrupt_safetensors_header(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path / "c")
    shard = ckpt / "model-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="corrupt safetensors header"):
        convert(ckpt, tmp_path / "out.gguf")


def test_output_in_missing_directory(good_ckpt, tmp_path, capsys):
    out = tmp_path / "nope" / "out.gguf"
    assert main(["convert", str(good_ckpt), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.parent.exists()


def test_unknown_type(good_ckpt, tmp_path):
    with pytest.raises(ConvertError, match="unknown output type 'q9_9'"):
        convert(good_ckpt, tmp_path / "out.gguf", "q9_9")


def test_interrupted_conversion_leaves_nothing_and_keeps_old_output(good_ckpt, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous good file")

    def interrupt(done, total, name):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(good_ckpt, out, "q8_0", on_progress=interrupt)
    assert out.read_bytes() == b"previous good file"
    assert _ggufs(tmp_path) == ["out.gguf"]
    convert(good_ckpt, out, "q8_0")  # re-running finishes
    assert out.read_bytes()[:4] == b"GGUF"
