"""The embedded demo model: committed as an HF checkpoint, converted to GGUF on first use."""
from __future__ import annotations

import hashlib
from pathlib import Path

from edgemoe.converters.convert import convert
from edgemoe.models import demo_dir
from edgemoe.models.cache import cache_dir

DEMO_TYPE = "q8_0"


def demo_gguf(out_type: str = DEMO_TYPE) -> Path:
    """Path of the demo model converted to `out_type`, converting once per checkpoint version."""
    src = demo_dir()
    weights = src / "model.safetensors"
    stamp = hashlib.sha256(f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir("demo") / f"demo-{out_type}-{stamp}.gguf"
    if not out.exists():
        convert(src, out, out_type)
    return out
