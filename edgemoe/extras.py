"""Optional extras: the few features whose heavy dependency `pip install edgemoe` leaves out.

Each is checked before its command does any work, so a run never fails minutes in with a bare
ImportError; the message names the pip command that installs what is missing.
"""
from __future__ import annotations

import importlib.util

# extra name -> the modules it installs (pyproject.toml [project.optional-dependencies])
EXTRAS = {"train": ("transformers",)}


def missing_extra(extra: str, needed_for: str) -> str | None:
    """None when every module of `extra` is importable, else a one-line message for the user."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"{needed_for} needs {', '.join(missing)}, which `pip install edgemoe` leaves out; "
            f"install it with: pip install 'edgemoe[{extra}]'")
