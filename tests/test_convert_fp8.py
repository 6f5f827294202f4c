"""FP8 checkpoints (e4m3 weights with 128x128 block `weight_scale_inv`, as DeepSeek-V3 and
Qwen3-*-FP8 ship) convert by dequantizing each tensor as it is read.

Checkpoint: the tiny qwen3moe one with every linear weight but the router quantized here to e4m3
with per-block scales (torch's float8_e4m3fn), config `quantization_config` as the hub writes it.
Oracle: the same weights dequantized by torch (llama.cpp's converter's recipe: repeat each scale
over its block, crop, multiply) saved as a plain f32 checkpoint; both convert to f32 GGUFs whose
tensors and llama.cpp logits must be identical, and transformers on the dequantized checkpoint
must agree with llama.cpp on the FP8 conversion."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgemoe.converters import fp8
from edgemoe.converters.convert import convert
from edgemoe.converters.errors import ConvertError
from edgemoe.converters.hf_checkpoint import HFCheckpoint
from oracles import hf_logits, llama_logits, rel_max_diff

BLOCK = (128, 128)
PROMPT_IDS = [3 + (37 * i + 11) % 500 for i in range(24)]
E4M3_MAX = 448.0


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (e4m3 [R, C], scale_inv f32 [ceil(R/Br), ceil(C/Bc)]) with w ~ q * scale_inv."""
    (rows, cols), (br, bc) = w.shape, block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(nr * br, nc * bc)
    padded[:rows, :cols] = w
    amax = padded.view(nr, br, nc, bc).abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale_inv = (amax / E4M3_MAX).float()
    return (w / expand(scale_inv, block, w.shape)).to(torch.float8_e4m3fn), scale_inv


def expand(scale: torch.Tensor, block: tuple[int, int], shape) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:shape[0], :shape[1]]


def dequantize_reference(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return q.float() * expand(scale_inv, block, q.shape)


def _is_quantized(name: str, t: torch.Tensor) -> bool:
    # as the FP8 releases: linear layers only; embeddings, norms, routers and lm_head stay
    return t.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and \
        not name.endswith("mlp.gate.weight") and not name.startswith("lm_head")


def write_fp8_pair(src: Path, fp8_dir: Path, ref_dir: Path, block=BLOCK) -> int:
    """An FP8 copy of checkpoint `src` and its dequantized f32 reference; returns #quantized."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    quantized, reference = {}, {}
    for name, t in tensors.items():
        if _is_quantized(name, t):
            q, s = quantize_blocks(t.float(), block)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            reference[name] = dequantize_reference(q, s, block)
        else:
            quantized[name] = reference[name] = t
    for folder, data in ((fp8_dir, quantized), (ref_dir, reference)):
        shutil.copytree(src, folder)
        (folder / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in data.items()}, str(folder / "model.safetensors"))
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return sum(_is_quantized(n, t) for n, t in tensors.items())


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    n = write_fp8_pair(tiny_checkpoint("qwen3moe"), root / "fp8", root / "ref")
    assert n > 20  # attention and every expert matrix
    return root / "fp8", root / "ref"


def test_e4m3_table_matches_torch():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(fp8.e4m3_table(), want)  # NaN where torch has NaN


def test_fp8_tensors_read_as_their_dequantized_values(pair):
    fp8_dir, ref_dir = pair
    got, ref = HFCheckpoint(fp8_dir), HFCheckpoint(ref_dir)
    assert not [n for n in got.tensors if n.endswith("_scale_inv")]
    assert sorted(got.tensors) == sorted(ref.tensors)
    n_fp8 = 0
    for name in ref.tensors:
        n_fp8 += got.tensors[name].dtype == fp8.FP8_DTYPE
        np.testing.assert_array_equal(got.load(name), ref.load(name), err_msg=name)
    assert n_fp8 > 20


def test_partial_edge_blocks():
    w = torch.randn(200, 150, generator=torch.Generator().manual_seed(0))
    q, s = quantize_blocks(w, (128, 96))
    assert s.shape == (2, 2)
    got = fp8.dequantize(q.view(torch.uint8).numpy(), s.numpy(), (128, 96), "w")
    np.testing.assert_array_equal(got, dequantize_reference(q, s, (128, 96)).numpy())
    assert np.abs(got - w.numpy()).max() <= np.abs(w.numpy()).max() / 8  # e4m3 keeps ~3 significant bits


def test_fp8_converts_to_the_same_model_as_its_dequantized_weights(pair, tmp_path):
    from gguf import GGUFReader

    fp8_dir, ref_dir = pair
    got, ref = convert(fp8_dir, tmp_path / "fp8.gguf", "f32").path, convert(ref_dir, tmp_path / "ref.gguf", "f32").path
    a, b = ({t.name: t for t in GGUFReader(path).tensors} for path in (got, ref))
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type
        np.testing.assert_array_equal(t.data, b[name].data, err_msg=name)
    logits = llama_logits(got, PROMPT_IDS)
    np.testing.assert_array_equal(logits, llama_logits(ref, PROMPT_IDS))
    assert rel_max_diff(logits, hf_logits(ref_dir, PROMPT_IDS)) < 1e-4


def _edit(src: Path, dst: Path, config=None, drop=(), rename=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop or rename:
        tensors = {k: v for k, v in load_file(str(dst / "model.safetensors")).items() if k not in drop}
        for old, new in (rename or {}).items():
            tensors[new] = tensors.pop(old)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


SCALE = "model.layers.0.self_attn.q_proj.weight_scale_inv"


@pytest.mark.parametrize("config, drop, rename, match", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, (), None, "quantized with 'gptq'.*unquantized"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, (), None, "e5m2"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, (), None, "weight_block_size"),
    (None, (SCALE,), None, "q_proj.weight is FP8 but the checkpoint has no .*_scale_inv"),
    (None, (), {SCALE: "model.layers.0.self_attn.x_proj.weight_scale_inv"}, "belongs to no FP8 weight"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, (), None,
     "scales have shape .* in 64x64 blocks needs"),
], ids=["other-method", "e5m2", "bad-block", "missing-scale", "orphan-scale", "wrong-block"])
def test_bad_fp8_checkpoints_get_one_clear_error(pair, tmp_path, config, drop, rename, match):
    folder = _edit(pair[0], tmp_path / "bad", config, drop, rename)
    with pytest.raises(ConvertError, match=match):
        convert(folder, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()
