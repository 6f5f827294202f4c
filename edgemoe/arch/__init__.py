"""Dense-path modules, one small file per GGUF architecture, registered by name."""
from __future__ import annotations

from edgemoe.gguf_file import ModelFileError

_REGISTRY: dict[str, type] = {}


def register(*gguf_archs: str):
    def deco(cls):
        for name in gguf_archs:
            _REGISTRY[name] = cls
        return cls
    return deco


def model_class(arch: str):
    from edgemoe.arch import deepseek2, llama, olmoe, qwen2moe, qwen3moe  # noqa: F401  (modules register on import)

    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ModelFileError(f"the edgemoe engine does not support architecture {arch!r} yet; "
                             f"supported: {', '.join(sorted(_REGISTRY))}") from None
