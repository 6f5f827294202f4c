"""Linux native AIO (io_setup / io_submit / io_getevents) through libc's syscall(): many O_DIRECT
reads in flight from one thread, with no reader threads to wake.

Why: the expert loader's reads are small where experts are (a Qwen3-30B-A3B expert is three
0.84 MiB parts). Issued from a pool of Python threads, each part needs a thread woken, scheduled
and handed the GIL before its read starts and again when it ends; on 2 cores busy with compute
that scheduling, not the disk, set the loader's speed (docs/ENGINE.md, the expert loader). With
AIO the calling thread submits every part in one system call and sleeps until the kernel has
completed them. Only O_DIRECT reads are asynchronous this way (buffered ones would block in
io_submit), so the loader sends only those here.

    ctx = AioContext(depth=32)          # None from AioContext.open() where AIO is unavailable
    results = ctx.run([(fd, address, nbytes, offset), ...], on_done=None)
    ctx.close()
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

# syscall numbers: x86-64 (arch/x86/entry/syscalls/syscall_64.tbl), arm64 (asm-generic/unistd.h)
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2), "arm64": (0, 1, 4, 2)}
IOCB_CMD_PREAD = 0


class _Iocb(ctypes.Structure):  # struct iocb, little-endian layout
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


assert ctypes.sizeof(_Iocb) == 64 and ctypes.sizeof(_Event) == 32

Read = tuple[int, int, int, int]  # (fd, destination address, nbytes, file offset)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


class AioContext:
    """One kernel AIO context with `depth` request slots, used by one thread at a time."""

    def __init__(self, depth: int = 32):
        numbers = _SYSCALLS.get(platform.machine())
        if not sys.platform.startswith("linux") or numbers is None or sys.byteorder != "little":
            raise OSError("Linux native AIO is not available on this platform")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._libc = _libc()
        self.depth = depth
        self._ctx = ctypes.c_ulong(0)
        if self._libc.syscall(ctypes.c_long(self._setup), ctypes.c_uint(depth), ctypes.byref(self._ctx)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_setup: {os.strerror(err)}")
        self._iocbs = (_Iocb * depth)()
        self._ptrs = (ctypes.POINTER(_Iocb) * depth)(*(ctypes.pointer(c) for c in self._iocbs))
        self._events = (_Event * depth)()
        self._free = list(range(depth))

    @classmethod
    def open(cls, depth: int = 32) -> "AioContext | None":
        """A context, or None where the platform or the kernel (seccomp, aio-max-nr) refuses one."""
        try:
            return cls(depth)
        except OSError:
            return None

    def run(self, reads: list[Read], on_done=None, acquire=None, stop=None, max_inflight: int | None = None) -> list[int]:
        """Read everything in `reads`, at most `depth` in flight; returns each read's byte count
        (a short count is the caller's to judge: O_DIRECT reads end short only at end of file).
        A read whose address is None gets one from `acquire(i)` when it is next to go out (None
        back: nothing free yet, it waits for a completion), and `on_done(i, nbytes)` runs as read i
        completes: bounded staging buffers go round that way. Raises OSError for the first failed
        read after every submitted read has completed (the kernel must be done writing into the
        caller's memory before the caller may reuse it); later reads are then not submitted.
        Once `stop()` is true no further read is submitted (those reads count 0 bytes);
        `max_inflight` caps the reads in flight below `depth` (background reads)."""
        results = [0] * len(reads)
        limit = min(max_inflight or self.depth, self.depth)
        error: OSError | None = None
        nxt = inflight = 0
        while (nxt < len(reads) and error is None) or inflight:
            n = 0
            if stop is not None and nxt < len(reads) and stop():
                nxt = len(reads)
            while nxt < len(reads) and inflight + n < limit and error is None:
                fd, address, nbytes, offset = reads[nxt]
                if address is None:
                    address = acquire(nxt)
                    if address is None:
                        break
                slot = self._free.pop()
                cb = self._iocbs[slot]
                cb.data, cb.opcode, cb.fildes = (nxt << 16) | slot, IOCB_CMD_PREAD, fd
                cb.buf, cb.nbytes, cb.offset = address, nbytes, offset
                self._ptrs[n] = ctypes.pointer(cb)
                n, nxt = n + 1, nxt + 1
            if n:
                done = self._libc.syscall(ctypes.c_long(self._submit), self._ctx, ctypes.c_long(n), self._ptrs)
                if done < 0:
                    err, done = ctypes.get_errno(), 0
                    error = error or OSError(err, f"io_submit: {os.strerror(err)}")
                for k in range(done, n):  # not taken by the kernel: its slot is free again
                    self._free.append(self._ptrs[k].contents.data & 0xFFFF)
                inflight += done
            if not inflight:
                if n == 0 and error is None and nxt < len(reads):
                    raise RuntimeError("acquire() gave no buffer with no read in flight to free one")
                continue
            got = self._libc.syscall(ctypes.c_long(self._getevents), self._ctx, ctypes.c_long(1),
                                     ctypes.c_long(self.depth), self._events, None)
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:  # a signal arrived; the reads are still in flight
                    continue
                self.close()  # io_destroy waits for the reads in flight: nothing writes into memory after
                raise OSError(err, f"io_getevents: {os.strerror(err)}")
            for e in self._events[:got]:
                i, slot = e.data >> 16, e.data & 0xFFFF
                self._free.append(slot)
                inflight -= 1
                if e.res < 0:
                    error = error or OSError(-e.res, f"read of {reads[i][2]} bytes at byte {reads[i][3]}: "
                                                     f"{os.strerror(-e.res)}")
                else:
                    results[i] = e.res
                if on_done is not None:
                    on_done(i, max(e.res, 0))
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        if self._ctx.value:
            self._libc.syscall(ctypes.c_long(self._destroy), self._ctx)
            self._ctx = ctypes.c_ulong(0)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
