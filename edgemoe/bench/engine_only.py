"""Which benchmark runs a model file can have: stock llama.cpp cannot load edgemoe's extended
layout (per-expert types, pruned layers, low-rank experts), so `edgemoe bench` and `bench
--max-memory` skip every llama.cpp run of such a file, labelled, and keep the engine's."""
from __future__ import annotations

from pathlib import Path


def llama_skip_reason(path: str | Path) -> str:
    """'' where stock llama.cpp can run the file, else why it cannot (said where its runs are skipped)."""
    from edgemoe.gguf_file import GGUFFile
    from edgemoe.layout import is_extended

    if is_extended(GGUFFile(path)):
        return "edgemoe extended layout, which llama.cpp cannot load (engine only)"
    return ""
