"""The project's own error types: bad input a user can fix.

Every error edgemoe raises for such input (a model file, a checkpoint, a flag or option value, a
budget, a trace, a profile, a predictor file, a missing native library) derives from
`EdgemoeError`; the CLI shows exactly these, and the OS's file errors, as one line with exit 2.
Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class EdgemoeError(Exception):
    """Bad input the user can act on; the message says what was wrong, with which file or value,
    and what to do."""


class InputError(EdgemoeError, ValueError):
    """A value the user gave (a flag, an option, a budget, a file's contents) that cannot be used.
    Also a ValueError: the chat's dialogs catch ValueError to show a message and keep the old value."""
