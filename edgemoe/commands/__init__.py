"""Plain functions behind each `edgemoe` subcommand, one module per command family; the CLI
(edgemoe/cli.py) only parses arguments.

    common.py    model path, engine options from flags, budgets, prompt files
    convert.py   convert, compress, inspect
    generate.py  generate, chat
    trace.py     trace, simulate
    measure.py   bench, eval, predictor train|bench
    tune.py      tune, --profile
"""
from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions shown as a one-line error (no traceback): bad input the user can fix, i.e. the
    project's own errors (edgemoe.errors) and the OS's file errors. Anything else is a bug and keeps
    its traceback, a ValueError from deep inside included."""
    from edgemoe.errors import EdgemoeError

    return (EdgemoeError, FileNotFoundError, PermissionError)
