"""FP8 checkpoints (DeepSeek-V3, Qwen3-*-FP8): float8 e4m3 weights, each with a block-wise
`<name>_scale_inv` tensor, dequantized to float32 as each tensor is read, so conversion still
streams one tensor at a time. The value of weight element (r, c) is fp8[r, c] * scale_inv[r // Br,
c // Bc] for `quantization_config.weight_block_size` = [Br, Bc] (the name says "inverse" because
the quantizer divided by it); edge blocks of a dimension that is not a multiple are partial.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgemoe.converters.errors import ConvertError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = "F8_E4M3"
# Tensors FP8 checkpoints carry that no converter needs (static activation scales; "dynamic"
# checkpoints have none).
_UNUSED_SUFFIXES = (".activation_scale", ".input_scale")


@functools.cache
def e4m3_table() -> np.ndarray:
    """float32 [256]: the value of each e4m3fn byte (1 sign, 4 exponent bits biased by 7, 3
    mantissa bits; no infinities, 0x7F/0xFF are NaN)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, (b & 0x7).astype(np.float64)
    value = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    value = np.where((exp == 15) & (man == 7), np.nan, value)
    return (sign * value).astype(np.float32)


def block_size(config: dict, config_path: Path) -> tuple[int, int] | None:
    """The FP8 weight block [rows, cols] of a checkpoint's config, None for an unquantized one;
    any other quantization is refused here, before any tensor is read."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConvertError(f"{config_path}: the checkpoint is quantized with {method!r}; edgemoe convert reads "
                           "float checkpoints (f32/f16/bf16) and block-scaled FP8 ones; use the model's "
                           "unquantized release")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConvertError(f"{config_path}: FP8 format {q.get('fmt')!r} is not supported (e4m3 is)")
    block = q.get("weight_block_size")
    if block is None:
        return (0, 0)  # one scale per tensor
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConvertError(f"{config_path}: quantization_config.weight_block_size {block!r} is not two positive "
                           "integers [rows, cols]")
    return block[0], block[1]


def is_unused(name: str) -> bool:
    return name.endswith(_UNUSED_SUFFIXES)


def dequantize(fp8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str) -> np.ndarray:
    """float32 values of `fp8` (uint8 bytes, [..., R, C]) with scales [..., ceil(R/Br), ceil(C/Bc)]
    (block (0, 0): one scale for the tensor)."""
    values = e4m3_table()[fp8]
    if block == (0, 0):
        if scale_inv.size != 1:
            raise ConvertError(f"tensor {name}: {scale_inv.size} scales but no weight_block_size in the config")
        return values * np.float32(scale_inv.reshape(()))
    (rows, cols), (br, bc) = fp8.shape[-2:], block
    want = (*fp8.shape[:-2], -(-rows // br), -(-cols // bc))
    if scale_inv.shape != want:
        raise ConvertError(f"tensor {name}: scales have shape {scale_inv.shape}, but a {fp8.shape} weight in "
                           f"{br}x{bc} blocks needs {want}; the checkpoint is inconsistent")
    # expand the scales over their blocks and crop the partial edge blocks: [..., R, C]
    values *= np.repeat(np.repeat(scale_inv.astype(np.float32), br, axis=-2), bc, axis=-1)[..., :rows, :cols]
    return values
