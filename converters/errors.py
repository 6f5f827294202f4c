"""Errors a user can act on: each says what was wrong, where, and what to do."""
from edgemoe.errors import EdgemoeError


class ConvertError(EdgemoeError):
    """A checkpoint or a conversion request that edgemoe cannot turn into a GGUF file."""
