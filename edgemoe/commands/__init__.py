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
    """Exceptions shown as a one-line error (no traceback): bad input the user can fix."""
    from edgemoe.converters.errors import ConvertError
    from edgemoe.gguf_file import ModelFileError
    from edgemoe.residency import BudgetError
    from edgemoe.trace import TraceError

    return (ConvertError, ModelFileError, BudgetError, TraceError, FileNotFoundError, PermissionError, ValueError)
