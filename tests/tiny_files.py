"""GGUF files of the tiny checkpoints (models/tiny.py) in every layout the engine reads, for tests
that need one per architecture: stock (`convert`), per-expert mixed precision (`convert_mixed`,
extended layout v1) and compressed (pruned layers and low-rank experts, extended layout v2)."""
from __future__ import annotations

from pathlib import Path

ARCHS = ["mixtral", "qwen2moe", "deepseek2", "olmoe", "qwen3moe"]
# models/tiny.py builds OLMoE with 2 KV heads for 4 query heads, which llama.cpp's olmoe loader
# cannot load and the converter refuses; real OLMoE has no GQA (as test_engine_archs)
CHECKPOINT_OVERRIDES = {"olmoe": {"num_key_value_heads": 4}}
# compressed files: HF layer -> kept original expert ids, and (layer, original id, role) -> rank
# (the tiny checkpoints: 3 layers x 8 experts, top-2, experts [256, 256]; DeepSeek's layer 0 is dense)
COMPRESS_PLAN = ({1: [0, 2, 3, 5, 6, 7], 2: [1, 4, 6]},
                 {(1, 2, "gate"): 32, (1, 2, "up"): 32, (1, 2, "down"): 48, (2, 4, "up"): 16, (2, 6, "down"): 64})


def checkpoint(arch: str, root: Path) -> Path:
    from edgemoe.models.tiny import tiny_checkpoint

    if arch not in CHECKPOINT_OVERRIDES:
        return tiny_checkpoint(arch)
    out = root / f"{arch}-hf"
    if not (out / "config.json").exists():
        from test_convert_archs import build_variant

        build_variant(arch, out, **CHECKPOINT_OVERRIDES[arch])
    return out


def stock(arch: str, qtype: str, root: Path) -> Path:
    from edgemoe.converters.convert import convert

    out = root / f"{arch}-{qtype}.gguf"
    if not out.exists():
        convert(checkpoint(arch, root), out, qtype)
    return out


def mixed(arch: str, root: Path) -> Path:
    from edgemoe.converters.mixed import convert_mixed

    out = root / f"{arch}-mixed.gguf"
    if not out.exists():
        convert_mixed(checkpoint(arch, root), out, avg_bits=4.0, n_tokens=256, n_threads=1)
    return out


def compressed(arch: str, root: Path) -> Path:
    """COMPRESS_PLAN's pruning and seeded random low-rank factors (a valid file, not a good model)."""
    import torch

    from edgemoe.converters.compress.export import CompressedModel, export_compressed
    from edgemoe.converters.compress.lowrank import Factors

    out = root / f"{arch}-compressed.gguf"
    if not out.exists():
        kept, ranks = COMPRESS_PLAN
        gen = torch.Generator().manual_seed(0)
        factors = {key: Factors(torch.randn(256, r, generator=gen) * 0.06, torch.randn(r, 256, generator=gen) * 0.06)
                   for key, r in ranks.items()}
        export_compressed(checkpoint(arch, root), out, CompressedModel(kept=kept, low_rank=factors),
                          dense_type="q8_0", expert_type="q8_0")
    return out
