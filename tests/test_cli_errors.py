"""The CLI shows the project's own errors (edgemoe.errors.EdgemoeError) as one line with exit 2,
and nothing else: a ValueError from a bug keeps its traceback (it used to be caught as user input).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edgemoe.cli import main
from edgemoe.errors import EdgemoeError, InputError


def test_every_project_error_type_is_an_edgemoe_error():
    from edgemoe.commands.common import PromptFileError
    from edgemoe.converters.allocation import AllocationError
    from edgemoe.converters.calib_text import CalibrationError
    from edgemoe.converters.compress.options import CompressError
    from edgemoe.converters.errors import ConvertError
    from edgemoe.gguf_file import ExpertReadError, ModelFileChanged, ModelFileError
    from edgemoe.memory import SizeError
    from edgemoe.native.lib import NativeLibraryError
    from edgemoe.predictor.base import PredictorError
    from edgemoe.residency import BudgetError
    from edgemoe.trace import TraceError
    from edgemoe.tune.profile import ProfileError
    from edgemoe.tune.sweep import TuneError

    for cls in (ConvertError, CalibrationError, AllocationError, CompressError, ModelFileError, ModelFileChanged,
                ExpertReadError, NativeLibraryError):
        assert issubclass(cls, EdgemoeError), cls
    # values the user gave stay ValueErrors too (the chat's dialogs catch ValueError)
    for cls in (SizeError, BudgetError, TraceError, ProfileError, TuneError, PredictorError, PromptFileError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError), cls


@pytest.mark.parametrize("argv,message", [
    (["generate", "--budget", "lots", "-p", "x"], "cannot read 'lots' as a byte size"),
    (["generate", "--dual-low", "q9_k", "-p", "x"], "low type 'q9_k'"),
    (["generate", "--policy", "belady", "-p", "x"], "--policy belady needs --trace"),
    (["generate", "--ctx", "16", "-n", "64", "-p", "x"], "exceed the context of 16"),
    (["trace", "-o", "t.json"], "give at least one prompt"),
    (["simulate", "missing-trace.json"], "missing-trace.json does not exist"),
    (["chat", "--top-p", "2"], "top-p must be in (0, 1]"),
])
def test_user_input_errors_are_one_line_with_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"edgemoe {argv[0]}: error: ") and message in err, err


_INTERNAL_BUG = textwrap.dedent("""
    import sys
    import edgemoe.inspect_model as inspect_model

    def broken(model):
        raise ValueError("internal bug: a shape no user input can produce")

    inspect_model.summarize = broken
    from edgemoe.cli import main
    from edgemoe.demo import demo_gguf
    sys.exit(main(["inspect", str(demo_gguf())]))
""")


def test_a_value_error_from_a_bug_keeps_its_traceback():
    done = subprocess.run([sys.executable, "-c", _INTERNAL_BUG], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "in broken" in done.stderr and "ValueError: internal bug" in done.stderr
    assert "edgemoe inspect: error:" not in done.stderr
