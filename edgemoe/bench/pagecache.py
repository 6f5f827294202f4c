"""A file's pages in the page cache: drop them (posix_fadvise DONTNEED) and count them (mincore).

The global drop_caches knob needs privileges a laptop user (and this machine) may not have; the
per-file advice drops every clean page no process has mapped. Dirty pages (a slice just written)
are flushed first, or the advice would skip them. `resident_bytes` is what `fincore` prints. The
page calls are the budgeted llama.cpp mode's (edgemoe/llama_pages.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from edgemoe.llama_pages import PAGE, drop_file_pages, map_anonymous, map_file_at, resident_pages, unmap


def drop_file_cache(path: str | os.PathLike) -> int:
    """Flush and drop the file's cached pages; returns the bytes still resident afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages are not dropped by the advice
        drop_file_pages(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return resident_bytes(path)


def resident_bytes(path: str | os.PathLike, offset: int = 0, length: int | None = None) -> int:
    """Bytes of [offset, offset+length) of the file in the page cache, by mincore on a fresh
    read-only mapping (mapping a file reads nothing; the count is per page)."""
    size = Path(path).stat().st_size
    length = size - offset if length is None else min(length, size - offset)
    if length <= 0:
        return 0
    start = offset - offset % PAGE
    span = -(-(length + offset - start) // PAGE) * PAGE
    addr = map_anonymous(span, populate=False)  # a range of our own for the MAP_FIXED file mapping
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            map_file_at(addr, span, fd, start)
        finally:
            os.close(fd)
        cached_pages = sum(resident_pages(addr, span))
    finally:
        unmap(addr, span)
    return min(cached_pages * PAGE, length + offset - start)
