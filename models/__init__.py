"""Model recipes: the demo corpus, tokenizer training, tiny per-architecture checkpoints for tests,
and the trained demo MoE that `edgemoe chat` runs when no model is given.

Installed as `edgemoe.models` (pyproject maps this folder).
"""

from __future__ import annotations

from pathlib import Path


def demo_dir() -> Path:
    """Folder of the committed demo checkpoint (HF config.json + model.safetensors + tokenizer).

    Resolved next to this file, which is where package data lands both in a source checkout and in
    an installed wheel; the checkpoint is small enough to ship as package data."""
    return Path(__file__).resolve().parent / "demo"
