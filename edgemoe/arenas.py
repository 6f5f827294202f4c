"""Expert arenas: resident experts of one layout (types, shapes, ranks) stacked as frames of one
memory range, seen by ggml as one 3-D tensor per matrix, [cols, rows, n_frames], so all chosen
experts of a layer run in one ggml_mul_mat_id per matrix with frame indices as ids.

An arena holds a frame for every expert of its layout (all layers): its address space is
reserved (an anonymous mapping with MAP_NORESERVE) but memory is committed only in frames that
were loaded. Frames of evicted experts go to a free list and keep their pages for the next load
of the same layout (no page faults on a cache miss); the committed bytes of all arenas stay within
`limit_bytes` (the expert budget): a load that needs a new frame first gives back the pages of
free frames (madvise MADV_DONTNEED), so resident memory never exceeds what the cache's budget
counts. A frame is `ExpertSpec.alloc_bytes` (page-rounded): what the budget counts per expert.

This is the CPU backend's arena (ggml_backend_cpu_buffer_from_ptr over our mapping). A device
backend would need device buffers sized from the budget and a frame table; not built here.
"""
from __future__ import annotations

import mmap
import sys
import threading

import numpy as np

from edgemoe.expert_store import PAGE_BYTES, ExpertSpec, ResidentExpert
from edgemoe.native.ops import Tensor
from edgemoe.native.buffers import HostTensors
from edgemoe.policies import Key

# reserve address space without committing memory (Python's mmap module names it from 3.12 on; the
# value is Linux's on every architecture)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def signature(spec: ExpertSpec) -> tuple:
    """What experts must share to be frames of one arena: each part's role, type and shape, and
    where it sits in the frame."""
    size, positions = spec.layout()
    return (spec.alloc_bytes, tuple((p.role, int(p.qtype), p.rows, p.cols, pos)
                                    for p, pos in zip(spec.parts, positions)))


class Arena:
    """Frames of one layout; `tensors[role]` is the [cols, rows, n_frames] view of each part."""

    def __init__(self, index: int, spec: ExpertSpec, n_frames: int, what: str):
        self.index, self.n_frames = index, n_frames
        self.frame_bytes = spec.alloc_bytes
        self.parts = spec.parts
        _, self.positions = spec.layout()
        self.roles = tuple(p.role for p in spec.parts)
        size = n_frames * self.frame_bytes + PAGE_BYTES  # + a page: the typed bases' last partial block
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self.array = np.frombuffer(self.memory, dtype=np.uint8)
        self.host = HostTensors(self.array.ctypes.data, size, max_tensors=2 * len(spec.parts) + 1, what=what)
        self.tensors: dict[str, Tensor] = {}
        bases: dict[int, Tensor] = {}
        for p, pos in zip(spec.parts, self.positions):
            # a 1-D tensor of the part's type over the whole mapping, viewed with the frame stride
            base = bases.get(int(p.qtype))
            if base is None:
                lib = self.host.lib
                block, type_bytes = lib.ggml_blck_size(int(p.qtype)), lib.ggml_type_size(int(p.qtype))
                base = bases[int(p.qtype)] = self.host.place(int(p.qtype), ((size // type_bytes) * block,), 0,
                                                            name=f"arena{index}.{p.qtype.name}")
            row = self.host.lib.ggml_row_size(int(p.qtype), p.cols)
            self.tensors[p.role] = self.host.ops.view_3d(base, p.cols, p.rows, n_frames, row, self.frame_bytes, pos)
        self.free: list[int] = []        # frames of evicted experts, pages still committed
        self.released: list[int] = []    # frames never used or given back (no pages)
        self.released.extend(range(n_frames - 1, -1, -1))

    def frame(self, i: int) -> np.ndarray:
        return self.array[i * self.frame_bytes:(i + 1) * self.frame_bytes]

    def release_pages(self, i: int) -> None:
        self.memory.madvise(mmap.MADV_DONTNEED, i * self.frame_bytes, self.frame_bytes)

    @property
    def low_rank(self) -> bool:
        return "gate" not in self.roles

    def close(self) -> None:
        self.host.close()
        del self.array
        try:
            self.memory.close()
        except BufferError:  # a frame view is still referenced somewhere: the mapping goes with it
            pass


class ArenaExpert:
    """A resident expert: frame `index` of `arena`. `close()` gives the frame back."""
    __slots__ = ("arena", "index", "spec", "owner", "_weights")

    def __init__(self, arena: Arena, index: int, spec: ExpertSpec, owner: "ExpertArenas"):
        self.arena, self.index, self.spec, self.owner, self._weights = arena, index, spec, owner, None

    @property
    def buffer(self) -> np.ndarray:
        return self.arena.frame(self.index)

    @property
    def matrices(self):
        """Each role as a Weight or LowRank over the frame (tools and tests; graphs use the arena)."""
        if self._weights is None:
            self._weights = ResidentExpert(self.spec, self.buffer)
        return self._weights.matrices

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
            self._weights = None
        if self.owner is not None:
            self.owner.free(self)
            self.owner = None


class ExpertArenas:
    """The arenas for a set of expert specs, and the frames' memory under `limit_bytes` (None: no limit)."""

    def __init__(self, specs: dict[Key, ExpertSpec], limit_bytes: int | None, what: str = "experts"):
        self.arenas: dict[tuple, Arena] = {}
        counts: dict[tuple, int] = {}
        first: dict[tuple, ExpertSpec] = {}
        for spec in specs.values():
            sig = signature(spec)
            counts[sig] = counts.get(sig, 0) + 1
            first.setdefault(sig, spec)
        for sig, n in counts.items():
            self.arenas[sig] = Arena(len(self.arenas), first[sig], n, f"{what} arena {len(self.arenas)}")
        self.by_index = list(self.arenas.values())
        self.limit_bytes = limit_bytes
        self.committed_bytes = 0
        self.lock = threading.Lock()

    def arena_of(self, spec: ExpertSpec) -> Arena:
        return self.arenas[signature(spec)]

    def allocate(self, spec: ExpertSpec) -> ArenaExpert:
        """A frame for `spec` (its bytes not yet loaded). Within the limit when the caller keeps
        the frames in use within it (the cache's budget does)."""
        arena = self.arena_of(spec)
        with self.lock:
            if arena.free:
                return ArenaExpert(arena, arena.free.pop(), spec, self)
            if not arena.released:
                raise RuntimeError(f"arena {arena.index} has no free frame (all {arena.n_frames} in use)")
            self._make_room(arena.frame_bytes)
            self.committed_bytes += arena.frame_bytes
            return ArenaExpert(arena, arena.released.pop(), spec, self)

    def _make_room(self, nbytes: int) -> None:
        if self.limit_bytes is None:
            return
        for other in self.by_index:
            while other.free and self.committed_bytes + nbytes > self.limit_bytes:
                i = other.free.pop()
                other.release_pages(i)
                other.released.append(i)
                self.committed_bytes -= other.frame_bytes

    def free(self, expert: ArenaExpert) -> None:
        with self.lock:
            expert.arena.free.append(expert.index)

    def set_limit(self, limit_bytes: int | None) -> None:
        with self.lock:
            self.limit_bytes = limit_bytes
            self._make_room(0)

    def close(self) -> None:
        for arena in self.by_index:
            arena.close()
        self.arenas.clear()
        self.by_index = []


def arena_cache_class():
    """The engine's ExpertCache: misses read straight into arena frames (one loader batch)."""
    from edgemoe.expert_cache import ExpertCache
    from edgemoe.expert_loader import spec_ranges

    class ArenaCache(ExpertCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.arenas = ExpertArenas(self.specs, self.budget_bytes)

        def _load(self, keys: list[Key]) -> list[ArenaExpert]:
            experts = [self.arenas.allocate(self.specs[k]) for k in keys]
            try:
                self.loader.read_many([(spec_ranges(self.specs[k]), e.buffer) for k, e in zip(keys, experts)])
            except BaseException:
                for e in experts:
                    e.close()
                raise
            return experts

        def set_budget(self, budget_bytes: int) -> None:
            super().set_budget(budget_bytes)
            self.arenas.set_limit(budget_bytes)

        def close(self) -> None:
            super().close()
            self.arenas.close()

    return ArenaCache
