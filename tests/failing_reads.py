"""FailingReads: expert reads that fail with EIO, the way a dying disk fails them, through both of
the expert loader's read paths (edgemoe/expert_loader.py): `os.preadv` (the reader threads and any
other plain read) and `AioContext.run` (native AIO, a batch of reads submitted at once)."""
from __future__ import annotations

import errno
import os

from edgemoe.linux_aio import AioContext


class FailingReads:
    """From the `after`-th read call on (preadv calls and AIO batches counted together), every
    read raises OSError(EIO) while `armed`; set `armed = False` to let reads through again."""

    def __init__(self, monkeypatch, after: int = 3):
        self.real_preadv, self.real_run = os.preadv, AioContext.run
        self.calls, self.after, self.armed = 0, after, True
        fail = self

        def run(ctx, reads, *args, **kwargs):
            if fail._fails():
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return fail.real_run(ctx, reads, *args, **kwargs)

        monkeypatch.setattr(os, "preadv", self)
        monkeypatch.setattr(AioContext, "run", run)

    def _fails(self) -> bool:
        self.calls += 1
        return self.armed and self.calls >= self.after

    def __call__(self, fd, buffers, offset):
        if self._fails():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.real_preadv(fd, buffers, offset)
