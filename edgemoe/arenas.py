"""Expert arenas: resident experts of one layout (types, shapes, ranks) stacked as frames of one
memory range, seen by ggml as one 3-D tensor per matrix, [cols, rows, n_frames], so all chosen
experts of a layer run in one ggml_mul_mat_id per matrix with frame indices as ids.

Two kinds of memory hold frames:
- mapped (any type): address space for a frame per expert of the layout (all layers) reserved
  with MAP_NORESERVE, memory committed only in frames that were loaded; a miss is read straight
  into its frame.
- repacked (types ggml's CPU backend multiplies faster with 8 rows interleaved, as llama.cpp's
  default CPU_REPACK buffers: edgemoe/native/repack.py): a ggml repack buffer of frames for the
  budget, grown by another arena of the layout if the budget grows; a miss is read into a
  staging buffer and repacked into its frame by ggml_backend_tensor_set.
Frames of evicted experts go to a free list and keep their pages for the next load of the same
layout (no page faults on a miss); the committed bytes of all arenas stay within `limit_bytes`
(the expert budget), so resident memory never exceeds what the cache's budget counts. A load
that needs a new frame over the limit takes free frames of other layouts: between mapped arenas
their pages move into the new frame (mremap, nothing copied, faulted or zeroed), otherwise they
are given back (MADV_DONTNEED) and the new frame faults fresh pages. Why the move: a per-layer
mixed Qwen3 slice under a 3 GiB cap gave back and faulted ~8 MiB per token, 2,097 minor faults
against 60 on its stock file, and its fresh 4 KiB pages took the loader's O_DIRECT reads at
1.4 GB/s against 2.0-2.6 into the huge pages moved frames keep (docs/BENCHMARKS.md). Only frames
under MOVE_FRAME_BYTES move: a move between addresses that differ modulo 2 MiB splits the huge
pages it touches, and on big frames that costs more than it saves (per-layer mixed Mixtral slice
at a 2296 MiB budget: moving 57-99 MiB frames left 568 of 2,827 MiB in huge pages and 7,859 minor
faults per token, against 2,256 MiB and 1,123 giving them back: a fault there fills a whole huge
page). A frame is `ExpertSpec.alloc_bytes` (page-rounded): what the budget counts per expert.

These are the CPU backend's arenas; a device backend would need device buffers and is not built.
"""
from __future__ import annotations

import mmap
import threading

import numpy as np

from edgemoe import llama_pages as pages
from edgemoe.dma_buffers import HUGE_PAGE, address_of, aligned_anonymous
from edgemoe.expert_store import PAGE_BYTES, ExpertSpec, ResidentExpert
from edgemoe.native import repack
from edgemoe.native.buffers import HostTensors
from edgemoe.native.ops import Tensor
from edgemoe.policies import Key


MOVE_FRAME_BYTES = 4 * HUGE_PAGE  # frames this big or bigger give their pages back instead of moving them


def signature(spec: ExpertSpec) -> tuple:
    """What experts must share to be frames of one arena: each part's role, type and shape, and
    where it sits in the frame."""
    size, positions = spec.layout()
    return (spec.alloc_bytes, tuple((p.role, int(p.qtype), p.rows, p.cols, pos)
                                    for p, pos in zip(spec.parts, positions)))


def repackable(spec: ExpertSpec) -> bool:
    """Every matrix of the layout multiplies faster repacked."""
    return all(repack.repacks(int(p.qtype), (p.cols, p.rows)) for p in spec.parts)


class _Mapped:
    """Reserved anonymous memory; frames are plain bytes we read into."""
    repacked = False

    def __init__(self, size: int, max_tensors: int, what: str):
        # huge pages: the loader's O_DIRECT reads land here (edgemoe/dma_buffers.py)
        self.memory, self.start = aligned_anonymous(size)
        self.array = np.frombuffer(self.memory, dtype=np.uint8, count=size, offset=self.start)
        self.host = HostTensors(self.array.ctypes.data, size, max_tensors, what)
        self.ops, self.lib, self.place = self.host.ops, self.host.lib, self.host.place
        self.address = address_of(self.memory) + self.start

    def release(self, offset: int, nbytes: int) -> None:
        self.memory.madvise(mmap.MADV_DONTNEED, self.start + offset, nbytes)

    def move(self, offset: int, nbytes: int, to: "_Mapped", to_offset: int) -> None:
        """Move the pages of [offset, offset+nbytes) to `to` at to_offset (what was there is
        replaced; here an empty mapping stays). Raises OSError where mremap cannot."""
        pages.move(self.address + offset, nbytes, to.address + to_offset)

    def close(self) -> None:
        self.host.close()
        del self.array
        try:
            self.memory.close()
        except BufferError:  # a frame view is still referenced somewhere: the mapping goes with it
            pass


class Arena:
    """Frames of one layout; `tensors[role]` is the [cols, rows, n_frames] view of each part."""

    def __init__(self, index: int, spec: ExpertSpec, n_frames: int, what: str, repacked: bool = False):
        self.index, self.n_frames = index, n_frames
        self.frame_bytes, self.parts = spec.alloc_bytes, spec.parts
        _, self.positions = spec.layout()
        self.roles = tuple(p.role for p in spec.parts)
        size = n_frames * self.frame_bytes + PAGE_BYTES  # + a page: the typed bases' last partial block
        n_tensors = 2 * len(spec.parts) + 1 + (n_frames * len(spec.parts) if repacked else 0)
        self.memory = repack.RepackBuffer(size, n_tensors, what) if repacked else _Mapped(size, n_tensors, what)
        self.repacked = repacked
        lib = self.memory.lib
        self.tensors: dict[str, Tensor] = {}
        bases: dict[int, Tensor] = {}
        for p, pos in zip(spec.parts, self.positions):
            # a 1-D tensor of the part's type over the whole memory, viewed with the frame stride
            qtype = int(p.qtype)
            if qtype not in bases:
                block, type_bytes = lib.ggml_blck_size(qtype), lib.ggml_type_size(qtype)
                bases[qtype] = self.memory.place(qtype, ((size // type_bytes) * block,), 0,
                                                 name=f"arena{index}.{p.qtype.name}")
            view = self.memory.ops.view_3d(bases[qtype], p.cols, p.rows, n_frames, lib.ggml_row_size(qtype, p.cols),
                                           self.frame_bytes, pos)
            if lib.ggml_backend_view_init(view.ptr) != 0:  # its buffer, so ggml picks the repacked kernels
                raise RuntimeError(f"{what}: ggml_backend_view_init failed")
            self.tensors[p.role] = view
        self._frame_parts: dict[int, list[Tensor]] = {}  # repacked: frame -> its parts as whole tensors
        self._lock = threading.Lock()
        self.free: list[int] = []                          # frames of evicted experts, pages still committed
        self.released: list[int] = list(range(n_frames - 1, -1, -1))  # never used or given back (no pages)

    def frame(self, i: int) -> np.ndarray:
        """Frame i's bytes (mapped arenas: a miss is read into them)."""
        if self.repacked:
            raise ValueError(f"arena {self.index} holds repacked frames: load them with store()")
        return self.memory.array[i * self.frame_bytes:(i + 1) * self.frame_bytes]

    def store(self, i: int, j: int, plain: np.ndarray) -> None:
        """Repacked arenas: part j of frame i := its plain bytes (repacked on the way in)."""
        with self._lock:  # loads run on the compute, prefetch and dual threads: one ggml context
            parts = self._frame_parts.get(i)
            if parts is None:
                parts = self._frame_parts[i] = [
                    self.memory.place(int(p.qtype), (p.cols, p.rows), i * self.frame_bytes + pos, p.nbytes,
                                      name=f"arena{self.index}.{i}")
                    for p, pos in zip(self.parts, self.positions)]
        self.memory.store(parts[j], plain)

    def close(self) -> None:
        self.memory.close()


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
    """The arenas for a set of expert specs, and the frames' memory under `limit_bytes` (None: no
    limit). repack: layouts ggml multiplies faster repacked get repacked arenas."""

    def __init__(self, specs: dict[Key, ExpertSpec], limit_bytes: int | None, what: str = "experts",
                 repack_layouts: bool = False):
        self.what, self.limit_bytes = what, limit_bytes
        self.counts: dict[tuple, int] = {}
        self.first: dict[tuple, ExpertSpec] = {}
        for spec in specs.values():
            sig = signature(spec)
            self.counts[sig] = self.counts.get(sig, 0) + 1
            self.first.setdefault(sig, spec)
        self.repacked = {sig for sig, spec in self.first.items() if repack_layouts and repackable(spec)}
        self.arenas: dict[tuple, list[Arena]] = {sig: [] for sig in self.counts}
        self.by_index: list[Arena] = []
        self.committed_bytes = 0
        self.moved_bytes = 0    # pages moved from free frames of one layout into new frames of another
        self.can_move = True    # cleared by the first failed mremap (an old kernel, the map count reached)
        self.lock = threading.Lock()
        for sig in self.counts:
            self._grow(sig)

    def _grow(self, sig: tuple) -> Arena:
        """Another arena of layout `sig`: mapped ones hold every expert of it; repacked ones as many
        as the limit can hold (all, without one)."""
        spec, have = self.first[sig], sum(a.n_frames for a in self.arenas[sig])
        n = self.counts[sig] - have
        if sig in self.repacked and self.limit_bytes is not None:
            n = min(n, max(1, self.limit_bytes // spec.alloc_bytes - have))
        if n <= 0:
            raise RuntimeError(f"{self.what}: every expert of a layout is resident; no frame is left")
        arena = Arena(len(self.by_index), spec, n, f"{self.what} arena {len(self.by_index)}", sig in self.repacked)
        self.arenas[sig].append(arena)
        self.by_index.append(arena)
        return arena

    def allocate(self, spec: ExpertSpec) -> ArenaExpert:
        """A frame for `spec` (its bytes not yet loaded). Within the limit when the caller keeps
        the frames in use within it (the cache's budget does)."""
        sig = signature(spec)
        with self.lock:
            chunks = self.arenas[sig]
            for arena in chunks:
                if arena.free:
                    return ArenaExpert(arena, arena.free.pop(), spec, self)
            arena = next((a for a in chunks if a.released), None) or self._grow(sig)
            i = arena.released.pop()
            self._make_room(arena.frame_bytes, into=(arena, i))
            self.committed_bytes += arena.frame_bytes
            return ArenaExpert(arena, i, spec, self)

    def _make_room(self, nbytes: int, into: tuple[Arena, int] | None = None) -> None:
        """Take free frames until `nbytes` more fit the limit; with `into` (an arena and a frame
        with no pages) their pages move into that frame where both arenas are mapped."""
        if self.limit_bytes is None:
            return
        filled = 0
        for other in self.by_index:
            while other.free and self.committed_bytes + nbytes > self.limit_bytes:
                i = other.free.pop()
                moved = 0
                if into is not None and filled < nbytes:
                    moved = self._move(other, i, *into, filled, min(other.frame_bytes, nbytes - filled))
                    filled += moved
                if moved < other.frame_bytes:  # the rest of the frame (all of it, where nothing moved)
                    other.memory.release(i * other.frame_bytes + moved, other.frame_bytes - moved)
                other.released.append(i)
                self.committed_bytes -= other.frame_bytes

    def _move(self, src: Arena, i: int, dst: Arena, j: int, at: int, nbytes: int) -> int:
        """Move the first `nbytes` of frame i of src into frame j of dst at `at`; the bytes moved."""
        if not self.can_move or src.repacked or dst.repacked:  # a repack buffer is ggml's memory, not ours to remap
            return 0
        if max(src.frame_bytes, dst.frame_bytes) >= MOVE_FRAME_BYTES:  # keep big frames' huge pages whole
            return 0
        try:
            src.memory.move(i * src.frame_bytes, nbytes, dst.memory, j * dst.frame_bytes + at)
        except OSError:  # ENOMEM past vm.max_map_count, EINVAL before Linux 5.7: give pages back from now on
            self.can_move = False
            return 0
        self.moved_bytes += nbytes
        return nbytes

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
    """The engine's ExpertCache: misses read straight into arena frames (one loader batch), or
    into staging buffers and repacked into them."""
    from edgemoe.expert_cache import ExpertCache
    from edgemoe.expert_loader import spec_ranges

    class ArenaCache(ExpertCache):
        def __init__(self, *args, repack_layouts: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.arenas = ExpertArenas(self.specs, self.budget_bytes, repack_layouts=repack_layouts)

        def _load(self, keys: list[Key]) -> list[ArenaExpert]:
            experts = [self.arenas.allocate(self.specs[k]) for k in keys]
            try:
                plain = [(k, e) for k, e in zip(keys, experts) if not e.arena.repacked]
                if plain:  # straight into their frames, every read in flight together
                    self.loader.read_many([(spec_ranges(self.specs[k]), e.buffer) for k, e in plain])
                for k, e in zip(keys, experts):
                    if e.arena.repacked:  # a matrix at a time through this thread's staging buffer, then repacked
                        for j, p in enumerate(self.specs[k].parts):
                            buf = repack.staging(p.nbytes)
                            self.loader.read_into([(p.offset, p.nbytes, 0)], buf)
                            e.arena.store(e.index, j, buf)
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
