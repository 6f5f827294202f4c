"""The GGUF output types `edgemoe convert --type` accepts, and how each maps to ggml."""
from __future__ import annotations

from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from edgemoe.converters.errors import ConvertError

# name -> (tensor type, file type recorded in general.file_type)
OUTPUT_TYPES: dict[str, tuple[QT, FT]] = {
    "f32": (QT.F32, FT.ALL_F32),
    "f16": (QT.F16, FT.MOSTLY_F16),
    "bf16": (QT.BF16, FT.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, FT.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, FT.MOSTLY_Q4_0),
    "q2_k": (QT.Q2_K, FT.MOSTLY_Q2_K),
    "q3_k": (QT.Q3_K, FT.MOSTLY_Q3_K_M),
    "q4_k": (QT.Q4_K, FT.MOSTLY_Q4_K_M),
    "q5_k": (QT.Q5_K, FT.MOSTLY_Q5_K_M),
    "q6_k": (QT.Q6_K, FT.MOSTLY_Q6_K),
}

# When a row length is not a multiple of a K-quant's 256-value block, fall back to a
# 32-value-block type of similar size, as llama-quantize does.
FALLBACK: dict[QT, QT] = {
    QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
    QT.Q4_0: QT.F16, QT.Q5_0: QT.F16, QT.Q5_1: QT.F16, QT.Q8_0: QT.F16,
}


def parse_output_type(name: str) -> tuple[QT, FT]:
    try:
        return OUTPUT_TYPES[name.lower()]
    except KeyError:
        raise ConvertError(f"unknown output type {name!r}; choose one of {', '.join(OUTPUT_TYPES)}") from None


def choose_type(requested: QT, n_per_row: int) -> QT:
    """The requested type if a row of `n_per_row` values fits its blocks, else the nearest fallback."""
    from edgemoe.native.quant import can_quantize

    qtype = requested
    while not can_quantize(qtype, n_per_row):
        qtype = FALLBACK[qtype]
    return qtype
