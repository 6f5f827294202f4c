"""Calibration text: the demo corpus's train split by default, or a file the user names (plain
text, or JSONL with one JSON string or {"text": ...} object per line)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgemoe.converters.errors import ConvertError

# below this many tokens the routing frequencies and importance matrices are mostly noise
MIN_CALIBRATION_TOKENS = 64


class CalibrationError(ConvertError):
    """Calibration text that is missing, unreadable, malformed or too short."""


@dataclass(frozen=True)
class CalibrationText:
    documents: list[str]
    source: str  # what the text is, for reports and the file's metadata


def calibration_text(path: str | Path | None = None) -> CalibrationText:
    if path is None:
        from edgemoe.models.corpus import load_corpus

        return CalibrationText(load_corpus().train, "demo corpus (train split)")
    from edgemoe.text import read_user_text

    path = Path(path)
    text = read_user_text(path, "calibration file", CalibrationError, "a plain-text (.txt) or JSONL (.jsonl) file")
    docs = _jsonl_documents(path, text) if path.suffix.lower() in (".jsonl", ".ndjson") else [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"calibration file {path} holds no text; calibration needs at least "
                               f"{MIN_CALIBRATION_TOKENS} tokens")
    return CalibrationText(docs, str(path))


def _jsonl_documents(path: Path, text: str) -> list[str]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path} line {n} is not JSON ({exc.msg}); each line must be a JSON string "
                                   'or an object with a "text" field') from None
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise CalibrationError(f'{path} line {n}: expected a JSON string or an object with a "text" string')
        docs.append(item)
    return docs


def check_enough(n_tokens: int, source: str) -> None:
    if n_tokens < MIN_CALIBRATION_TOKENS:
        raise CalibrationError(f"calibration text {source} gives {n_tokens} tokens; at least "
                               f"{MIN_CALIBRATION_TOKENS} are needed")
