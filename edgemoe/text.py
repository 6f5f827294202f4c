"""Streaming detokenization: tokens can end in the middle of a UTF-8 character."""
from __future__ import annotations


def split_complete_utf8(buf: bytes) -> tuple[str, bytes]:
    """(decoded text of the complete characters, the trailing incomplete bytes to keep)."""
    for cut in range(len(buf), max(len(buf) - 4, -1), -1):
        try:
            return buf[:cut].decode("utf-8"), buf[cut:]
        except UnicodeDecodeError:
            continue
    return buf.decode("utf-8", errors="replace"), b""
