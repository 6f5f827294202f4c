"""ggml tensors that live in one ggml buffer across graphs: allocated by the backend (`Buffer`:
KV cache, activations between graphs) or placed in memory we own or map, without a copy
(`HostTensors`: expert arenas; `FileWeights`: a model file's tensors over its memmap).

Everything ggml would assert on is checked here first: 32-byte alignment of every address and
that each tensor's ggml byte size equals the bytes it is given.
"""
from __future__ import annotations

import ctypes

from edgemoe.native import ops
from edgemoe.native.lib import InitParams
from edgemoe.native.ops import Ops, Tensor

ALIGNMENT = 32  # ggml_backend_cpu_buffer_from_ptr asserts 32-byte alignment


def check_aligned(address: int, what: str) -> None:
    if address % ALIGNMENT:
        raise ValueError(f"{what}: memory at {address:#x} is not {ALIGNMENT}-byte aligned")


class StoredTensors:
    """A ggml context of tensors (no data of its own) and the one buffer holding their bytes."""
    ctx = buffer = None

    def close(self) -> None:
        if self.ctx:
            if self.buffer:
                self.lib.ggml_backend_buffer_free(self.buffer)
            self.lib.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class PlacedTensors(StoredTensors):
    """ggml tensors placed at offsets of one buffer's memory [address, address + nbytes)."""

    def _init(self, buffer: int, address: int, nbytes: int, max_tensors: int, what: str) -> None:
        check_aligned(address, what)
        self.lib, self.what = ops.lib(), what
        self.buffer, self.address, self.nbytes = buffer, address, nbytes
        self.ctx = self.lib.ggml_init(InitParams(self.lib.ggml_tensor_overhead() * max_tensors, None, True))
        self.ops, self.max_tensors, self.count = Ops(self.ctx), max_tensors, 0

    def place(self, type_: int, ne: tuple[int, ...], offset: int, nbytes: int | None = None, name: str = "") -> Tensor:
        """A contiguous tensor of `type_` and shape `ne` at address + offset. nbytes: the bytes the
        caller has there (checked against ggml's size for the shape)."""
        need = ops.nbytes(type_, tuple(ne) + (1,) * (4 - len(ne)))
        label = f"{self.what}: {name or 'tensor'}"
        if nbytes is not None and nbytes != need:
            raise ValueError(f"{label}: {nbytes} bytes given, ggml needs {need} for type {type_} ne {tuple(ne)}")
        if (self.address + offset) % ALIGNMENT or offset < 0 or offset + need > self.nbytes:
            raise ValueError(f"{label}: bytes {offset}..{offset + need} are misaligned or outside the "
                             f"{self.nbytes} mapped bytes")
        if self.count >= self.max_tensors:
            raise RuntimeError(f"{self.what}: more than {self.max_tensors} tensors")
        self.count += 1
        t = self.ops.new(type_, ne)
        if name:
            self.lib.ggml_set_name(t.ptr, name[:63].encode())
        status = self.lib.ggml_backend_tensor_alloc(self.buffer, t.ptr, ctypes.c_void_p(self.address + offset))
        if status != 0:
            raise RuntimeError(f"{label}: ggml_backend_tensor_alloc failed with status {status}")
        return t


class HostTensors(PlacedTensors):
    """ggml tensors placed in one caller-owned memory range [address, address + nbytes), zero copy.
    The caller keeps the memory mapped while this object (and any graph using its tensors) lives."""

    def __init__(self, address: int, nbytes: int, max_tensors: int, what: str):
        check_aligned(address, what)  # before the buffer: ggml_backend_cpu_buffer_from_ptr asserts it
        buffer = ops.lib().ggml_backend_cpu_buffer_from_ptr(ctypes.c_void_p(address), nbytes)
        if not buffer:
            raise MemoryError(f"{what}: ggml_backend_cpu_buffer_from_ptr failed")
        self._init(buffer, address, nbytes, max_tensors, what)


class FileWeights:
    """A model file's tensors as ggml tensors over its memmap, made on first use; with `repack`,
    `matrix(name)` gives a weight ggml multiplies faster repacked (edgemoe.native.repack) as a
    repacked copy, read from the file (its mapped pages are not touched)."""

    def __init__(self, model, repack: bool = False):
        data = model.mapped  # the whole file, mapped read-only (page-aligned)
        self.model, self.repack = model, repack
        self.host = HostTensors(data.ctypes.data, model.size, max_tensors=len(model.tensors) + 1,
                                what=str(model.path))
        self._made: dict[str, Tensor] = {}
        self._repacked: dict[str, tuple] = {}  # name -> (tensor, its buffer)

    def __getitem__(self, name: str) -> Tensor:
        t = self._made.get(name)
        if t is None:
            info = self.model.tensors[name]  # a missing tensor is a ModelFileError naming the file
            t = self.host.place(int(info.qtype), tuple(reversed(info.shape)), info.offset, info.nbytes, name)
            self._made[name] = t
        return t

    def get(self, name: str) -> Tensor | None:
        return self[name] if name in self.model.tensors else None

    def matrix(self, name: str) -> Tensor:
        """Weight `name` as the first operand of ggml_mul_mat: repacked where that is faster."""
        from edgemoe.native import repack

        info = self.model.tensors[name]
        ne = tuple(reversed(info.shape))
        if not self.repack or len(ne) != 2 or not repack.repacks(int(info.qtype), ne):
            return self[name]
        if name not in self._repacked:
            import os

            buf = repack.RepackBuffer(info.nbytes, 1, f"{self.model.path}: {name}")
            t = buf.place(int(info.qtype), ne, 0, info.nbytes, name)
            data = repack.staging(info.nbytes)
            fd = os.open(self.model.path, os.O_RDONLY)
            try:
                if os.preadv(fd, [memoryview(data)], info.offset) != info.nbytes:
                    raise OSError(f"short read of {name} from {self.model.path}")
            finally:
                os.close(fd)
            buf.store(t, data)
            self._repacked[name] = (t, buf)
        return self._repacked[name][0]

    def close(self) -> None:
        for _, buf in self._repacked.values():
            buf.close()
        self._repacked.clear()
        self.host.close()


class Buffer(StoredTensors):
    """Tensors that live across graphs (KV cache, activations between a layer's graphs), allocated
    together in one buffer of the backend's buffer type and zeroed."""

    def __init__(self, backend, shapes: dict[str, tuple[int, tuple[int, ...]]]):
        lib = ops.lib()
        self.lib = lib
        size = lib.ggml_tensor_overhead() * (len(shapes) + 1)
        self.ctx = lib.ggml_init(InitParams(size, None, True))
        o = Ops(self.ctx)
        self.tensors = {name: o.new(type_, ne) for name, (type_, ne) in shapes.items()}
        self.buffer = lib.ggml_backend_alloc_ctx_tensors(self.ctx, backend.handle)
        if not self.buffer:
            raise MemoryError(f"could not allocate {sum(ops.nbytes(t, ne) for t, ne in shapes.values())} bytes "
                              "for ggml tensors")
        lib.ggml_backend_buffer_clear(self.buffer, 0)
        self.nbytes = lib.ggml_backend_buffer_get_size(self.buffer)

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]
