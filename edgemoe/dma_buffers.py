"""Memory that O_DIRECT reads fill at the disk's speed: private anonymous mappings at a 2 MiB
boundary with transparent huge pages asked for (MADV_HUGEPAGE).

Why: an O_DIRECT read is cut into block requests by the physical contiguity of its destination.
This machine's virtio disk takes at most 254 segments and 4 MiB per request, so a destination of
scattered 4 KiB pages goes out as ~1 MiB requests, and one of 2 MiB huge pages as 4 MiB ones.
Measured here, one stream of 8 MiB O_DIRECT reads at random offsets of a cold file: 1.3-1.6 GB/s
into 4 KiB pages, 4.3-4.6 GB/s into huge pages (docs/ENGINE.md, the expert loader). The kernel
grants huge pages to madvised anonymous memory under the default THP mode (`madvise`); Python's
`mmap.mmap(-1, n)` is MAP_SHARED (shmem, which that mode leaves at 4 KiB), so it is not used
for such buffers. Where THP is off the advice fails quietly and the memory is plain pages.

    memory, start = aligned_anonymous(64 << 20)   # memory[start:start + 64 MiB] is 2 MiB-aligned
    advise_huge(addr, nbytes)                     # for memory mapped through libc (llama_pages)
"""
from __future__ import annotations

import ctypes
import mmap
import sys

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def address_of(buffer) -> int:
    """Address of a writable buffer's first byte (an mmap, a memoryview of one; 0 when empty)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if len(buffer) else 0


def aligned_anonymous(nbytes: int) -> tuple[mmap.mmap, int]:
    """(mapping, start): `nbytes` of private anonymous memory at mapping[start:], start 2 MiB-aligned
    for buffers of a huge page or more, huge pages asked for. Pages are faulted on first touch
    (MAP_NORESERVE: untouched bytes cost nothing)."""
    pad = HUGE_PAGE if nbytes >= HUGE_PAGE else 0
    memory = mmap.mmap(-1, max(nbytes + pad, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    start = (-address_of(memory)) % HUGE_PAGE if pad else 0
    if pad and hasattr(memory, "madvise"):
        try:
            memory.madvise(MADV_HUGEPAGE, start, nbytes)
        except OSError:  # THP compiled out or disabled: plain pages
            pass
    return memory, start


def advise_huge(libc, addr: int, nbytes: int) -> None:
    """Ask for huge pages over [addr, addr+nbytes) of memory mapped through libc (a failure,
    e.g. THP off, leaves plain pages)."""
    if nbytes >= HUGE_PAGE:
        libc.madvise(addr, nbytes, MADV_HUGEPAGE)
