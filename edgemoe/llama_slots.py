"""Expert residency inside llama.cpp's own mapping of the model file.

llama.cpp (mmap, no repack) computes on the file's bytes where it mapped them. An expert is made
resident by reading its bytes with O_DIRECT into a *slot* (anonymous pages faulted once, kept in
a pool) and moving the slot's pages over the expert's interior pages in that mapping
(mremap: page-table entries move, nothing is copied or zeroed). Eviction moves the pages back
to the slot's home and maps the file there again. A part's partial pages at its edges (shared
with a neighbouring expert or a dense tensor) stay file-backed: llama.cpp faults them in from
the page cache; those not shared with dense data are charged to the expert and dropped when no
resident expert still needs them.

Why not the page cache: buffered fills reach ~1.3-1.7 GB/s here and fadvise alone left evicted
pages cached; fresh anonymous memory per miss faults and zeroes every page (~1 GB/s); reused
slots filled with O_DIRECT from 4 threads read at 2.4-2.7 GB/s (docs/ENGINE.md).

Huge pages survive the move. llama.cpp computes on a page cache that holds the file in large
folios mapped 2 MiB at a time (FilePmdMapped), while slots moved in 4 KiB at a time made the
same kernels 1.5-1.7x slower on the Mixtral slice (TLB misses over ~1.6 GB of expert bytes per
token). mremap moves a whole huge page only between 2 MiB-aligned addresses, so a slot holds
each part in two regions: its *middle*, the 2 MiB-aligned run of the part's pages in llama.cpp's
mapping, at a 2 MiB-aligned place in the slot (moved as huge pages, there and back), and its
*head and tail* (under 2 MiB each) in the slot's remaining room (moved as small pages). The
slot's size is unchanged: the middle region holds as many huge pages as the widest part spans,
and when a part's alignment leaves one of them unused, its head and tail go there.

Geometry is file offsets; `MappedExperts` turns them into addresses of llama.cpp's mapping.
"""
from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass

from edgemoe.dma_buffers import HUGE_PAGE
from edgemoe.expert_loader import ExpertLoader, memory_at
from edgemoe.expert_store import ExpertSpec
from edgemoe.llama_pages import (MADV_DONTNEED, MADV_RANDOM, PAGE, Mapping, advise, drop_file_pages, map_anonymous,
                                 map_file_at, move, populate, unmap)
from edgemoe.policies import Key


def _down(n: int) -> int:
    return n // PAGE * PAGE


def _up(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class ExpertPages:
    """One expert's pages, as file offsets. interiors[i]: part i's whole pages (offset, nbytes;
    nbytes may be 0); regions[i]: part i's room in the expert's slot, (middle offset, middle
    bytes, rest offset, rest bytes): the middle region 2 MiB-aligned in the slot and a multiple
    of 2 MiB (0 for parts under one huge page), the rest for its head and tail."""
    key: Key
    interiors: tuple[tuple[int, int], ...]
    regions: tuple[tuple[int, int, int, int], ...]
    slot_bytes: int
    edges: tuple[int, ...]  # offsets of its partial pages that hold no dense bytes

    @property
    def charge_bytes(self) -> int:
        """What the budget counts: the slot plus every partial page it may keep cached."""
        return self.slot_bytes + len(self.edges) * PAGE


class _DenseIndex:
    """Which pages hold bytes of a dense (non-expert) tensor."""

    def __init__(self, ranges: list[tuple[int, int]]):
        merged: list[list[int]] = []
        for a, b in sorted((o, o + n) for o, n in ranges if n > 0):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts, self.ends = [a for a, _ in merged], [b for _, b in merged]

    def touches(self, page: int) -> bool:
        # disjoint sorted intervals: only the last one starting before the page's end can reach into it
        i = bisect.bisect_left(self.starts, page + PAGE)
        return i > 0 and self.ends[i - 1] > page


def expert_pages(specs: dict[Key, ExpertSpec], dense_ranges: list[tuple[int, int]]) -> dict[Key, ExpertPages]:
    """Page geometry of every expert. Parts of the same size get slots of the same page count
    (the largest interior among them: alignment varies by one page), so freed slots fit the
    next miss of the same shape."""
    dense = _DenseIndex(dense_ranges)
    interior = {k: [(_up(p.offset), max(_down(p.offset + p.nbytes) - _up(p.offset), 0)) for p in s.parts]
                for k, s in specs.items()}
    widest: dict[tuple[str, int], int] = {}
    for k, s in specs.items():
        for p, (_, n) in zip(s.parts, interior[k]):
            widest[(p.role, p.nbytes)] = max(widest.get((p.role, p.nbytes), 0), n)
    out = {}
    for k, s in specs.items():
        room = [widest[(p.role, p.nbytes)] for p in s.parts]
        middles = [n // HUGE_PAGE * HUGE_PAGE for n in room]  # first in the slot: 2 MiB-aligned
        rests, pos = [], sum(middles)
        for n, m in zip(room, middles):
            rests.append(pos)
            pos += n - m
        regions = tuple((sum(middles[:i]), m, r, n - m) for i, (n, m, r) in enumerate(zip(room, middles, rests)))
        edges = set()
        for p, (start, n) in zip(s.parts, interior[k]):
            for page in {_down(p.offset), _down(p.offset + p.nbytes - 1)}:  # the partial pages, if any
                if not start <= page < start + n and not dense.touches(page):
                    edges.add(page)
        out[k] = ExpertPages(k, tuple(interior[k]), regions, pos, tuple(sorted(edges)))
    return out


Piece = tuple[int, int, int]  # (file offset, nbytes, offset in the slot)


def slot_pieces(g: ExpertPages, address_of) -> list[Piece]:
    """Where each interior page of expert `g` sits in its slot, given `address_of(file offset)` in
    llama.cpp's mapping: a part's 2 MiB-aligned middle at its middle region (address and slot
    place congruent modulo 2 MiB, so mremap moves whole huge pages), its head and tail in the
    room left (the middle region's unused end, then the rest region)."""
    pieces: list[Piece] = []
    for (o, n), (mid_at, mid_room, rest_at, rest_room) in zip(g.interiors, g.regions):
        if not n:
            continue
        head = min((-address_of(o)) % HUGE_PAGE, n) if mid_room else n
        mid = min((n - head) // HUGE_PAGE * HUGE_PAGE, mid_room)
        if mid == 0:
            head = n
        room = [(mid_at + mid, mid_room - mid), (rest_at, rest_room)]
        if mid:
            pieces.append((o + head, mid, mid_at))
        for start, size in ((o, head), (o + head + mid, n - head - mid)):
            while size:
                at, free = room[0]
                take = min(size, free)
                if take:
                    pieces.append((start, take, at))
                    start, size = start + take, size - take
                room[0] = (at + take, free - take)
                if room[0][1] == 0:
                    room.pop(0)
    return pieces


def page_runs(ranges) -> list[tuple[int, int]]:
    """(offset, nbytes) byte ranges -> the sorted, merged whole-page runs that cover them."""
    runs: list[list[int]] = []
    for o, n in sorted((_down(o), _up(o + n) - _down(o)) for o, n in ranges if n > 0):
        if runs and o <= runs[-1][0] + runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], o + n - runs[-1][0])
        else:
            runs.append([o, n])
    return [(o, n) for o, n in runs]


def expert_runs(geometry: dict[Key, ExpertPages]) -> list[tuple[int, int]]:
    """Every page an expert may hold (interiors and charged edges) as sorted (offset, nbytes) runs."""
    return page_runs([(o, n) for g in geometry.values() for o, n in g.interiors]
                     + [(e, PAGE) for g in geometry.values() for e in g.edges])


class SlotPool:
    """Anonymous slots, faulted once and reused; free slots are kept by size. A new slot first
    unmaps free slots of other sizes, so the pool stays within what the caller allows."""

    def __init__(self):
        self.free: dict[int, list[int]] = {}   # slot bytes -> home addresses
        self.sizes: dict[int, int] = {}        # home address -> slot bytes (every slot)
        self.bytes = 0

    def take(self, nbytes: int, limit_bytes: int) -> int:
        """A free slot of `nbytes`, else a new one after trimming free slots to `limit_bytes`."""
        if self.free.get(nbytes):
            return self.free[nbytes].pop()
        self.trim(limit_bytes - nbytes)
        addr = map_anonymous(nbytes)
        self.sizes[addr] = nbytes
        self.bytes += nbytes
        return addr

    def give(self, addr: int) -> None:
        self.free.setdefault(self.sizes[addr], []).append(addr)

    def trim(self, limit_bytes: int) -> None:
        """Unmap free slots until the pool holds at most `limit_bytes` (or nothing is free)."""
        for size, homes in self.free.items():
            while homes and self.bytes > limit_bytes:
                addr = homes.pop()
                unmap(addr, size)
                del self.sizes[addr]
                self.bytes -= size

    def close(self) -> None:
        """Unmap every slot (call only when all slots are home)."""
        for addr, size in self.sizes.items():
            unmap(addr, size)
        self.sizes, self.free, self.bytes = {}, {}, 0


def read_exactly(path: str, runs: list[tuple[int, int]], chunk_bytes: int = 8 * 2**20) -> None:
    """Bring exactly `runs` into the page cache: buffered reads through a descriptor marked
    POSIX_FADV_RANDOM (no readahead past a run's end into expert pages). POSIX_FADV_WILLNEED
    stopped after 128 MiB here, and faulting a random-access mapping in reads page by page
    (515 MiB of dense pages: 79 s that way, 0.43 s this way)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        scratch = memoryview(bytearray(chunk_bytes))
        for o, n in runs:
            for c in range(o, o + n, chunk_bytes):
                os.preadv(fd, [scratch[:min(chunk_bytes, o + n - c)]], c)
    finally:
        os.close(fd)


class MappedExpert:
    """A resident expert: its slot's pages sit in llama.cpp's mapping until `close()`."""

    def __init__(self, owner: "MappedExperts", pages: ExpertPages, slot: int, pieces: list[Piece]):
        self.owner, self.pages, self.slot, self.pieces = owner, pages, slot, pieces

    def close(self) -> None:
        if self.slot:
            self.owner.unplace(self)
            self.slot = 0


class MappedExperts:
    """Places experts into llama.cpp's mapping `mapping` of `path` and takes them out again."""

    def __init__(self, path: str | os.PathLike, mapping: Mapping, geometry: dict[Key, ExpertPages],
                 loader: ExpertLoader, pool_limit_bytes: int):
        self.path, self.mapping, self.geometry, self.loader = os.fspath(path), mapping, geometry, loader
        self.fd = os.open(self.path, os.O_RDONLY)  # our own descriptor for mapping the file back
        self.pool, self.pool_limit_bytes = SlotPool(), pool_limit_bytes
        self.lock = threading.Lock()
        self.placed: dict[Key, MappedExpert] = {}
        self._edge_users: dict[int, set[Key]] = {}  # edge page -> placed experts that charge it

    def addr(self, offset: int) -> int:
        return self.mapping.start + offset - self.mapping.offset

    # ---- set-up -------------------------------------------------------------------------
    def drop_all(self, dense_runs: list[tuple[int, int]], others: list[Mapping] = ()) -> None:
        """After load llama.cpp has populated its whole mapping; keep only the dense pages.

        Everything is dropped and the dense runs read back: the page cache holds a file in large
        folios (ext4, Linux >= 6.16), and a folio that straddles a dense page and an expert's
        cannot be dropped while the dense page is mapped. Read back range by range, folios stay
        inside dense runs. `others`: the process's other mappings of the file (a GGUF reader's
        memmap); their pages would keep the cache's copies too. The mapping reads without
        read-around from now on, so a fault never pulls an expert's pages in behind the budget."""
        advise(self.mapping.start, self.mapping.size, MADV_RANDOM)
        advise(self.mapping.start, self.mapping.size, MADV_DONTNEED)
        for m in others:
            advise(m.start, m.size, MADV_DONTNEED)
        drop_file_pages(self.fd, 0, os.fstat(self.fd).st_size)
        inside = [(lo, hi - lo) for lo, hi in ((max(o, self.mapping.offset), min(o + n, self.mapping.offset
                                                                               + self.mapping.size))
                                               for o, n in dense_runs) if lo < hi]
        read_exactly(self.path, inside)
        for o, n in inside:
            populate(self.addr(o), n)

    # ---- residency ----------------------------------------------------------------------
    def place(self, keys: list[Key]) -> list[MappedExpert]:
        """Read `keys` into slots (all reads in flight together) and move them into the mapping.
        On failure nothing stays placed and every slot is back in the pool."""
        geo = [self.geometry[k] for k in keys]
        pieces = [slot_pieces(g, self.addr) for g in geo]
        with self.lock:
            slots = [self.pool.take(g.slot_bytes, self._slot_limit()) for g in geo]
        try:
            self.loader.read_many([(p, memory_at(slot, g.slot_bytes)) for g, p, slot in zip(geo, pieces, slots)])
        except BaseException:
            with self.lock:
                for slot in slots:
                    self.pool.give(slot)
            raise
        done: list[MappedExpert] = []
        with self.lock:
            try:
                for g, p, slot in zip(geo, pieces, slots):
                    self._move_in(p, slot)
                    done.append(MappedExpert(self, g, slot, p))
                    self.placed[g.key] = done[-1]
                    for e in g.edges:
                        self._edge_users.setdefault(e, set()).add(g.key)
                self._trim()
            except BaseException:
                for m in done:
                    self._take_out(m)
                for slot in slots[len(done):]:
                    self.pool.give(slot)
                raise
        for g in geo:  # start reading the partial pages llama.cpp will fault in
            for e in g.edges:
                os.posix_fadvise(self.fd, e, PAGE, os.POSIX_FADV_WILLNEED)
        return done

    def _move_in(self, pieces: list[Piece], slot: int) -> None:
        moved = []
        try:
            for o, n, pos in pieces:
                move(slot + pos, n, self.addr(o))
                moved.append((o, n, pos))
        except BaseException:
            for o, n, pos in moved:
                self._move_out(o, n, slot + pos)
            raise

    def _move_out(self, offset: int, nbytes: int, home: int) -> None:
        move(self.addr(offset), nbytes, home)
        map_file_at(self.addr(offset), nbytes, self.fd, offset)
        advise(self.addr(offset), nbytes, MADV_RANDOM)

    def unplace(self, m: MappedExpert) -> None:
        with self.lock:
            self._take_out(m)

    def _take_out(self, m: MappedExpert) -> None:
        g = m.pages
        for o, n, pos in m.pieces:
            self._move_out(o, n, m.slot + pos)
        self.placed.pop(g.key, None)
        for e in g.edges:
            users = self._edge_users.get(e, set())
            users.discard(g.key)
            if not users:
                self._edge_users.pop(e, None)
                self.drop_pages(e, PAGE)
        self.pool.give(m.slot)

    def drop_pages(self, offset: int, nbytes: int) -> None:
        """Unmap file pages of the mapping and drop them from the page cache (always safe: a
        later touch reads the file again)."""
        advise(self.addr(offset), nbytes, MADV_DONTNEED)
        drop_file_pages(self.fd, offset, nbytes)

    def stream(self, keys: list[Key]) -> None:
        """Experts computed from the file this once (they do not fit the budget beside the
        layer's others): start their reads now; `drop` them after the layer."""
        for k in keys:
            for o, n in self.geometry[k].interiors:
                os.posix_fadvise(self.fd, o, n, os.POSIX_FADV_WILLNEED)

    def drop(self, keys: list[Key]) -> None:
        with self.lock:
            for k in keys:
                if k in self.placed:
                    continue
                for o, n in self.geometry[k].interiors:
                    if n:
                        self.drop_pages(o, n)
                for e in self.geometry[k].edges:
                    if not self._edge_users.get(e):
                        self.drop_pages(e, PAGE)

    def _slot_limit(self) -> int:
        """Slots and the partial pages placed experts keep cached stay within the budget together."""
        return self.pool_limit_bytes - len(self._edge_users) * PAGE

    def _trim(self) -> None:
        self.pool.trim(self._slot_limit())

    def set_pool_limit(self, limit_bytes: int) -> None:
        with self.lock:
            self.pool_limit_bytes = limit_bytes
            self._trim()

    def close(self) -> None:
        """Take every expert out (llama.cpp's mapping is the file again) and free the pool."""
        with self.lock:
            for m in list(self.placed.values()):
                self._take_out(m)
                m.slot = 0
            self.pool.close()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
