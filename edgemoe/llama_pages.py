"""Page-level memory calls the budgeted llama.cpp runtime needs, and the engine's arenas (`move`)
too (libc through ctypes), and where llama.cpp mapped the model file (/proc/self/maps).

Every address and size is checked for page alignment in Python before the call: the kernel
would answer EINVAL, but a wrong MAP_FIXED or MREMAP_FIXED address silently replaces whatever
was mapped there, so nothing reaches libc unchecked. Failures raise OSError with the call named.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from dataclasses import dataclass

from edgemoe.dma_buffers import HUGE_PAGE, MAP_NORESERVE, advise_huge
from edgemoe.errors import EdgemoeError

PAGE = mmap.PAGESIZE

PROT_READ, PROT_WRITE = mmap.PROT_READ, mmap.PROT_WRITE
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MADV_RANDOM, MADV_DONTNEED, MADV_POPULATE_READ, MADV_POPULATE_WRITE = 1, 4, 22, 23
MAP_FAILED = ctypes.c_void_p(-1).value


class PagesUnsupported(EdgemoeError, RuntimeError):
    """This system lacks a call the budgeted llama.cpp mode needs."""


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    vp, sz, i, off = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_long
    for name, res, args in (("mmap", vp, [vp, sz, i, i, i, off]), ("munmap", i, [vp, sz]),
                            ("mremap", vp, [vp, sz, sz, i, vp]), ("madvise", i, [vp, sz, i]),
                            ("mincore", i, [vp, sz, ctypes.c_void_p])):
        fn = getattr(libc, name, None)
        if fn is None:
            raise PagesUnsupported(f"libc has no {name}(); the budgeted llama.cpp mode needs Linux")
        fn.restype, fn.argtypes = res, args
    return libc


_LIBC = None


def libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = _libc()
    return _LIBC


def _check(what: str, *values: int) -> None:
    for v in values:
        if v % PAGE:
            raise ValueError(f"{what}: {v:#x} is not a multiple of the page size {PAGE}")


def _fail(call: str, addr: int, size: int) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}({addr:#x}, {size}) failed: {os.strerror(err)}")


def map_anonymous(size: int, populate: bool = True) -> int:
    """Private anonymous read/write pages; `populate` faults them all in now (once). A huge page
    or more starts at a 2 MiB boundary with huge pages asked for: O_DIRECT fills of physically
    contiguous memory go out as 4 MiB requests, ~3x faster here (edgemoe/dma_buffers.py)."""
    _check("map_anonymous size", size)
    pad = HUGE_PAGE if size >= HUGE_PAGE else 0
    addr = libc().mmap(None, size + pad, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if addr in (None, MAP_FAILED):
        raise _fail("mmap", 0, size + pad)
    if pad:  # keep the aligned [start, start+size) and give the rest back
        start = addr + (-addr) % HUGE_PAGE
        for lo, n in ((addr, start - addr), (start + size, addr + pad - start)):
            if n:
                unmap(lo, n)
        addr = start
        advise_huge(libc(), addr, size)
    if populate and libc().madvise(addr, size, MADV_POPULATE_WRITE) != 0:
        ctypes.memset(addr, 0, size)  # before Linux 5.14: touch every page by hand
    return addr


def map_file_at(addr: int, size: int, fd: int, offset: int, shared: bool = True) -> None:
    """Map `size` bytes of the file at `offset` read-only over [addr, addr+size), replacing what
    is there (MAP_FIXED: the caller owns that range)."""
    _check("map_file_at", addr, size, offset)
    flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_FIXED
    got = libc().mmap(addr, size, PROT_READ, flags, fd, offset)
    if got != addr:
        raise _fail("mmap(MAP_FIXED)", addr, size)


def unmap(addr: int, size: int) -> None:
    _check("unmap", addr, size)
    if libc().munmap(addr, size) != 0:
        raise _fail("munmap", addr, size)


def move(src: int, size: int, dst: int) -> None:
    """Move the pages at [src, src+size) to dst (replacing what is there) without copying them;
    src keeps an empty mapping (MREMAP_DONTUNMAP), so no hole opens that another mmap could take."""
    _check("move", src, size, dst)
    got = libc().mremap(src, size, size, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, dst)
    if got != dst:
        raise _fail("mremap", src, size)


def advise(addr: int, size: int, advice: int) -> None:
    _check("madvise", addr, size)
    if size and libc().madvise(addr, size, advice) != 0:
        raise _fail("madvise", addr, size)


def populate(addr: int, size: int) -> None:
    """Fault a file range of a mapping in now (its page-table entries made present)."""
    _check("populate", addr, size)
    if size and libc().madvise(addr, size, MADV_POPULATE_READ) != 0:
        ctypes.string_at(addr, 1)  # before Linux 5.14: the pages fault in when first read
        for a in range(addr, addr + size, PAGE):
            ctypes.c_char.from_address(a).value


def drop_file_pages(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to drop the file's cached pages in the range (clean, unmapped ones go)."""
    if size > 0:
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)


def resident_pages(addr: int, size: int) -> bytearray:
    """mincore: one byte per page, bit 0 set where the page is resident (file pages: in the page
    cache; anonymous pages: present)."""
    _check("mincore", addr, size)
    n = size // PAGE
    vec = (ctypes.c_ubyte * max(n, 1))()
    if n and libc().mincore(addr, size, vec) != 0:
        raise _fail("mincore", addr, size)
    return bytearray(v & 1 for v in vec[:n])


def probe_dontunmap() -> None:
    """Raise PagesUnsupported unless mremap(MREMAP_DONTUNMAP) works here (Linux >= 5.7)."""
    if not sys.platform.startswith("linux"):
        raise PagesUnsupported(f"the budgeted llama mode moves pages with Linux's mremap; {sys.platform} has none: "
                               "run without --budget, or use --backend edgemoe")
    a = map_anonymous(PAGE)
    b = map_anonymous(PAGE, populate=False)
    try:
        move(a, PAGE, b)
    except OSError as exc:
        raise PagesUnsupported(f"mremap(MREMAP_DONTUNMAP) is not available ({exc.strerror}); the budgeted "
                               "llama.cpp mode needs Linux 5.7 or newer; run without --budget") from None
    finally:
        unmap(a, PAGE)
        unmap(b, PAGE)


# ---- where the file is mapped -----------------------------------------------------------------
@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str    # e.g. "r--s"
    offset: int   # file offset of `start`

    @property
    def size(self) -> int:
        return self.end - self.start

    def covers(self, offset: int, nbytes: int) -> bool:
        return self.offset <= offset and offset + nbytes <= self.offset + self.size


def file_mappings(path: str | os.PathLike) -> list[Mapping]:
    """This process's mappings of `path` (matched by device and inode, not by name)."""
    st = os.stat(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or int(fields[4]) != st.st_ino:
                continue
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if os.makedev(major, minor) != st.st_dev:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append(Mapping(lo, hi, fields[1], int(fields[2], 16)))
    return out


def mapping_rss_bytes(start: int, end: int) -> tuple[int, int]:
    """(file-backed, anonymous) resident bytes of the mappings within [start, end), from
    /proc/self/smaps: the file-backed part is what RssFile counts for them."""
    rss = anon = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = start <= lo and hi <= end
            elif inside and head in ("Rss:", "Anonymous:"):
                kib = int(line.split()[1]) * 1024
                rss, anon = (rss + kib, anon) if head == "Rss:" else (rss, anon + kib)
    return rss - anon, anon
