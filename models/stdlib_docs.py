"""Collect the docstrings of the Python standard library; run as a script in a child process.

Importing every stdlib module has side effects we do not want in the caller (modules that print,
open a browser, register signal handlers, start Tk), so `models.corpus` runs this file with
`python -I stdlib_docs.py OUT.json` and reads the JSON back. It imports only the stdlib for the
same reason, and `-I` keeps the working directory off `sys.path` so a local file cannot shadow a
stdlib name.

Order is deterministic: modules sorted by dotted name, members sorted by attribute name.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import sys
import types
import warnings

# Top-level modules never imported: side effects (antigravity opens a browser, this prints),
# GUI toolkits, test suites, tooling whose import does work, and our own separate source
# (pydoc_data is read directly by models.corpus).
SKIP_TOP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "ensurepip",
    "lib2to3", "pydoc_data", "__main__", "__phello__", "__hello__", "_pyrepl",
})
# Submodule names skipped anywhere in a package tree.
SKIP_PARTS = frozenset({"test", "tests", "__main__", "idle_test"})
MIN_DOC_CHARS = 20


def _import_quietly(name: str) -> types.ModuleType | None:
    """Import `name`; None if it fails or writes anything while importing (a sign of side effects)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            module = importlib.import_module(name)
    except BaseException:  # ImportError, SyntaxError, SystemExit from platform checks, ...
        return None
    return None if out.getvalue() else module


def _module_names() -> list[str]:
    """Dotted names of public stdlib modules, packages walked recursively, sorted."""
    names: list[str] = []
    todo = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_TOP)
    while todo:
        name = todo.pop(0)
        module = _import_quietly(name)
        if module is None:
            continue
        names.append(name)
        for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
            if not info.name.startswith("_") and info.name not in SKIP_PARTS:
                todo.append(f"{name}.{info.name}")
    return sorted(names)


def _doc(obj: object) -> str | None:
    """The object's own cleaned docstring (not inherited, unlike inspect.getdoc)."""
    try:
        doc = obj.__doc__
    except Exception:
        return None
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc)
    return doc if len(doc) >= MIN_DOC_CHARS else None


def _member_docs(cls: type) -> list[str]:
    """Docstrings of methods and properties defined in `cls` itself, by attribute name."""
    docs = []
    for _, member in sorted(vars(cls).items()):
        member = getattr(member, "__func__", member)  # staticmethod / classmethod
        if inspect.isroutine(member) or isinstance(member, property):
            docs.append(_doc(member))
    return [d for d in docs if d]


def module_docs(module: types.ModuleType) -> list[str]:
    """Module docstring, then docstrings of the classes/functions the module itself defines."""
    docs = [_doc(module)]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported from elsewhere: collected at its home module
        if inspect.isclass(obj):
            docs.append(_doc(obj))
            docs.extend(_member_docs(obj))
        elif inspect.isroutine(obj):
            docs.append(_doc(obj))
    return [d for d in docs if d]


def collect() -> list[str]:
    """All stdlib docstrings in deterministic order (duplicates kept; the caller dedupes)."""
    warnings.simplefilter("ignore")
    docs: list[str] = []
    for name in _module_names():
        docs.extend(module_docs(sys.modules[name]))
    return docs


if __name__ == "__main__":
    result = collect()
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f)
    # Some imported modules leave non-daemon threads or atexit hooks behind; we are done.
    sys.stdout.flush()
    os._exit(0)
