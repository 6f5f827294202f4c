"""Text from outside: streaming detokenization (tokens can end in the middle of a UTF-8
character), and the UTF-8 text of a file the user named."""
from __future__ import annotations

from pathlib import Path


def split_complete_utf8(buf: bytes) -> tuple[str, bytes]:
    """(decoded text of the complete characters, the trailing incomplete bytes to keep)."""
    for cut in range(len(buf), max(len(buf) - 4, -1), -1):
        try:
            return buf[:cut].decode("utf-8"), buf[cut:]
        except UnicodeDecodeError:
            continue
    return buf.decode("utf-8", errors="replace"), b""


def read_user_text(path: Path, what: str, error: type[Exception], expect: str) -> str:
    """The UTF-8 text of a file the user named, or one `error` that says which file ("calibration
    file" = `what`) and what to give instead (`expect`: "a .txt or .jsonl file")."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder; give {expect}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}); give {expect}") from None
