"""What `pip install edgemoe` brings is enough for every command; the one optional extra (`train`:
transformers) is checked before any work starts and named in the error."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from edgemoe.extras import EXTRAS, missing_extra

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_FOLDERS = ("edgemoe", "converters", "native", "tui", "models")
# Files that import an extra's module, each behind an up-front check (or test-only).
GUARDED = {
    "transformers": {
        "converters/compress/lora.py",      # compress --lora-steps: checked in options.check_options
        "converters/compress/study.py",     # the pruning study (a test/docs tool, not a command)
        "models/train_demo.py",             # re-training the demo: checked in main()
        "models/tiny.py",                   # tiny test checkpoints (tests only)
        "models/tokenizer.py",              # tokenizer training for tests and the demo recipe
        "models/demo_report.py",            # the demo's training report (part of the recipe)
    },
}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _closure(dists: set[str]) -> set[str]:
    """`dists` and everything they require when installed without extras (as pip resolves them)."""
    seen, todo = set(), list(dists)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [r for r in _dist_names([q for q in requires if "extra ==" not in q]) if r not in seen]
    return seen


def _third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "edgemoe"}


def test_every_runtime_import_is_installed_by_the_plain_install_or_a_checked_extra():
    main = _closure(_dist_names(_project()["dependencies"]))
    dists = importlib.metadata.packages_distributions()
    problems = []
    for folder in RUNTIME_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for module in _third_party_imports(path):
                owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
                if owners & main:
                    continue
                if rel in GUARDED.get(module, set()):
                    continue
                problems.append(f"{rel} imports {module} ({', '.join(sorted(owners))}), which `pip install edgemoe` "
                                "does not install")
    assert not problems, "\n".join(problems)


def test_sentencepiece_is_installed_by_the_plain_install():
    main = _dist_names(_project()["dependencies"])
    assert {"sentencepiece", "protobuf"} <= main  # Mixtral's tokenizer.model (convert, compress)
    assert "transformers" not in main


def test_extras_table_matches_pyproject():
    extras = _project()["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert set(modules) <= _dist_names(extras[extra])
    assert "edgemoe[train]" in extras["dev"]  # the tests' oracle comes through the same pin


@pytest.fixture
def no_transformers(monkeypatch):
    """transformers as if it were not installed (find_spec -> None, import -> ImportError)."""
    monkeypatch.setitem(sys.modules, "transformers", None)


def test_missing_extra_names_the_pip_command(no_transformers):
    message = missing_extra("train", "X")
    assert message is not None and "pip install 'edgemoe[train]'" in message and "transformers" in message


def test_missing_extra_is_none_when_installed():
    assert missing_extra("train", "X") is None  # the dev install has it


def test_lora_without_transformers_fails_before_any_work(no_transformers, tmp_path):
    from edgemoe.converters.compress.options import CompressError, CompressOptions
    from edgemoe.converters.compress.pipeline import prepare

    # a folder that is not a checkpoint: the extra check must come before the checkpoint is read
    with pytest.raises(CompressError, match=r"--lora-steps 2 .*pip install 'edgemoe\[train\]'"):
        prepare(tmp_path / "missing", tmp_path / "c.gguf", CompressOptions(lora_steps=2))
    assert not (tmp_path / "c.gguf").exists()


def test_compress_cli_names_the_extra(no_transformers, tmp_path, capsys):
    from edgemoe.cli import main

    code = main(["compress", str(tmp_path), "-o", str(tmp_path / "c.gguf"), "--lora-steps", "2"])
    assert code == 2
    assert "pip install 'edgemoe[train]'" in capsys.readouterr().err


def test_compress_without_lora_does_not_need_transformers(no_transformers, tmp_path):
    from edgemoe.converters.compress.options import CompressOptions, check_options

    check_options(CompressOptions(prune=0.25))  # no error: only --lora-steps needs the extra


def test_train_demo_without_transformers_exits_with_the_extra(no_transformers, tmp_path):
    from edgemoe.models.train_demo import main

    with pytest.raises(SystemExit, match=r"pip install 'edgemoe\[train\]'"):
        main(["--out", str(tmp_path / "demo"), "--steps", "1"])
    assert not (tmp_path / "demo").exists()
