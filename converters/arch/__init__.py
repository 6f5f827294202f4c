"""Architecture registry: one small module per HF architecture, registered by name."""
from edgemoe.converters.arch import deepseek2, mixtral, olmoe, qwen2moe, qwen3moe  # noqa: F401  (register on import)
from edgemoe.converters.arch.base import ArchConverter, PlannedTensor, converter_for, supported_architectures

__all__ = ["ArchConverter", "PlannedTensor", "converter_for", "supported_architectures"]
