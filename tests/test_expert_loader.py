"""ExpertLoader: bytes equal the file's, O_DIRECT where alignment allows, errors reach the caller;
through native AIO and through the reader threads alike."""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest

from edgemoe.expert_loader import BLOCK_BYTES, ExpertLoader, memory_at, spec_ranges
from edgemoe.expert_store import expert_buffer, stock_experts
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.linux_aio import AioContext

SIZE = 3 * 2**20 + 1234


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture(params=[True, False], ids=["aio", "threads"])
def aio(request):
    if request.param and AioContext.open(1) is None:
        pytest.skip("this kernel refuses a native AIO context")
    return request.param


def test_congruent_ranges_read_direct_with_buffered_edges(data_file, aio):
    path, data = data_file
    loader = ExpertLoader(path, threads=4, chunk_bytes=64 * 1024, aio=aio)
    assert loader.uses_aio == (aio and loader.direct)
    try:
        dest = mmap.mmap(-1, 2 * 2**20)  # page-aligned
        # file offset 5000 -> dest 5000 (congruent mod 4096): head, direct interior, tail
        ranges = [(5000, 1_000_000, 5000), (1_500_000 + 100, 300_000, 1_200_000)]
        assert loader.read_into(ranges, dest) == 1_300_000
        for off, n, pos in ranges:
            assert dest[pos:pos + n] == data[off:off + n]
        s = loader.stats()
        assert s.bytes_read == 1_300_000 and s.reads == 1 and s.bandwidth_bps > 0
        if loader.direct:
            # the first range's aligned interior went O_DIRECT, its edges buffered (bounced with
            # AIO, which takes O_DIRECT only); the second is incongruent: all of it O_DIRECT
            # through the bounce buffer
            interior = (5000 + 1_000_000) // BLOCK_BYTES * BLOCK_BYTES - 2 * BLOCK_BYTES
            assert s.direct_bytes == (1_300_000 if aio else interior + 300_000)
    finally:
        loader.close()


def test_incongruent_ranges_bounce_to_the_last_byte(data_file, aio):
    """A stock GGUF's tensors sit at 32-byte alignment: read O_DIRECT around them and copied, up to
    the file's short last block; a range that was truncated away is a clear error."""
    path, data = data_file
    loader = ExpertLoader(path, threads=2, chunk_bytes=64 * 1024, aio=aio)
    try:
        dest = np.zeros(SIZE, dtype=np.uint8)
        ranges = [(32 * 7, 200_000, 3), (SIZE - 70_001, 70_001, 300_000)]
        assert loader.read_into(ranges, dest) == 270_001
        for off, n, pos in ranges:
            assert dest[pos:pos + n].tobytes() == data[off:off + n]
        if loader.direct:
            assert loader.stats().direct_bytes == 270_001
        os.truncate(path, SIZE - 50_000)
        with pytest.raises(ModelFileError, match="short read"):
            loader.read_into([(SIZE - 60_001, 20_000, 0)], dest)
    finally:
        loader.close()


def test_read_many_into_numpy_and_raw_memory(data_file, aio):
    path, data = data_file
    loader = ExpertLoader(path, threads=3, chunk_bytes=BLOCK_BYTES * 8, aio=aio)
    try:
        a = np.zeros(400_000, dtype=np.uint8)
        raw = mmap.mmap(-1, 3 * BLOCK_BYTES)
        view = np.frombuffer(raw, dtype=np.uint8)
        b = memory_at(view.ctypes.data, 3 * BLOCK_BYTES)
        n = loader.read_many([([(7, 400_000, 0)], a), ([(BLOCK_BYTES, 3 * BLOCK_BYTES, 0)], b)])
        assert n == 400_000 + 3 * BLOCK_BYTES
        assert a.tobytes() == data[7:400_007]
        assert bytes(raw) == data[BLOCK_BYTES:4 * BLOCK_BYTES]
    finally:
        loader.close()


def test_bad_ranges_and_read_errors_are_raised(data_file, monkeypatch):
    path, _ = data_file
    loader = ExpertLoader(path, chunk_bytes=64 * 1024, aio=False)
    try:
        with pytest.raises(ModelFileError, match="beyond the end of the model file"):
            loader.read_into([(SIZE - 10, 20, 0)], bytearray(20))
        with pytest.raises(ValueError, match="does not fit"):
            loader.read_into([(0, 20, 0)], bytearray(10))
        real = os.preadv
        calls = []

        def failing(fd, bufs, off):
            calls.append(off)
            if len(calls) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd, bufs, off)

        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(OSError, match="Input/output error"):
            loader.read_into([(0, 2 * 2**20, 0)], bytearray(2 * 2**20))
        monkeypatch.setattr(os, "preadv", real)
        buf = bytearray(100)
        assert loader.read_into([(0, 100, 0)], buf) == 100, "the loader works after a failed read"
    finally:
        loader.close()


def test_a_failed_aio_read_is_raised_after_its_batch_and_the_loader_goes_on(data_file, tmp_path):
    """A read the kernel fails (here: a descriptor not open for reading) reaches the caller as
    OSError once every read of the batch has completed, and the next read works."""
    path, data = data_file
    loader = ExpertLoader(path, chunk_bytes=64 * 1024)
    if not loader.uses_aio:
        loader.close()
        pytest.skip("no native AIO here (or no O_DIRECT)")
    good = loader.direct_fd
    bad = os.open(tmp_path / "w.bin", os.O_WRONLY | os.O_CREAT)
    try:
        loader.direct_fd = bad
        with pytest.raises(OSError, match="Bad file descriptor"):
            loader.read_into([(0, 2**20, 0)], memory_at(*_aligned(2**20)))
        loader.direct_fd = good
        buf = memory_at(*_aligned(2**20))
        assert loader.read_into([(BLOCK_BYTES, 2**20, 0)], buf) == 2**20
        assert bytes(buf) == data[BLOCK_BYTES:BLOCK_BYTES + 2**20]
    finally:
        loader.direct_fd = good
        os.close(bad)
        loader.close()


_KEEP = []


def _aligned(nbytes: int) -> tuple[int, int]:
    """(address, nbytes) of page-aligned memory kept alive for the test session."""
    from edgemoe.dma_buffers import address_of, aligned_anonymous

    memory, start = aligned_anonymous(nbytes)
    _KEEP.append(memory)
    return address_of(memory) + start, nbytes


def test_aio_context_reads_bounded_staging_and_stops(data_file):
    """AioContext alone: reads whose buffers come from acquire() go round a pool smaller than the
    batch, stop() ends submission, a bad descriptor is an OSError, not a crash."""
    path, data = data_file
    ctx = AioContext.open(4)
    if ctx is None:
        pytest.skip("this kernel refuses a native AIO context")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        pool = [_aligned(BLOCK_BYTES)[0] for _ in range(2)]
        held, got = {}, {}

        def acquire(i):
            if pool:
                held[i] = pool.pop()
                return held[i]
            return None

        def done(i, n):
            got[i] = bytes(memory_at(held[i], n))
            pool.append(held.pop(i))

        reads = [(fd, None, BLOCK_BYTES, i * BLOCK_BYTES) for i in range(9)]
        assert ctx.run(reads, on_done=done, acquire=acquire) == [BLOCK_BYTES] * 9
        assert all(got[i] == data[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES] for i in range(9))
        assert len(pool) == 2
        calls = []
        out = ctx.run([(fd, _aligned(BLOCK_BYTES)[0], BLOCK_BYTES, 0)] * 6,
                      stop=lambda: calls.append(1) or len(calls) > 1, max_inflight=1)
        assert out[0] == BLOCK_BYTES and out[1:].count(0) >= 4, out
        with pytest.raises(OSError):
            ctx.run([(-1, _aligned(BLOCK_BYTES)[0], BLOCK_BYTES, 0)])
        assert ctx.run([(fd, _aligned(BLOCK_BYTES)[0], BLOCK_BYTES, 0)]) == [BLOCK_BYTES]
    finally:
        os.close(fd)
        ctx.close()


def test_expert_spec_ranges_match_the_file():
    from edgemoe.demo import demo_gguf

    path = demo_gguf()
    f = GGUFFile(path)
    raw = path.read_bytes()
    loader = ExpertLoader(path)
    try:
        for spec in list(stock_experts(f).values())[:3]:
            buf = expert_buffer(spec)
            loader.read_into(spec_ranges(spec), buf)
            for p, pos in zip(spec.parts, spec.layout()[1]):
                assert buf[pos:pos + p.nbytes].tobytes() == raw[p.offset:p.offset + p.nbytes]
    finally:
        loader.close()


def test_cancelled_background_read_skips_its_chunks(data_file, aio):
    import threading

    from edgemoe.expert_loader import ReadCancelled

    path, data = data_file
    loader = ExpertLoader(path, threads=2, chunk_bytes=BLOCK_BYTES, aio=aio)
    try:
        cancel = threading.Event()
        cancel.set()
        before = loader.stats().bytes_read
        with loader.background(cancel), pytest.raises(ReadCancelled):
            loader.read_into([(0, 64 * BLOCK_BYTES, 0)], bytearray(64 * BLOCK_BYTES))
        assert loader.stats().bytes_read == before, "no chunk of a cancelled read was read"
        with loader.background(threading.Event()):  # not cancelled: a normal read, behind demand chunks
            buf = bytearray(8 * BLOCK_BYTES)
            assert loader.read_into([(BLOCK_BYTES, len(buf), 0)], buf) == len(buf)
        assert bytes(buf) == data[BLOCK_BYTES:9 * BLOCK_BYTES]
    finally:
        loader.close()


def test_random_expert_bench_reads_the_demo_both_ways(capsys, monkeypatch):
    """edgemoe.bench.loader_random (docs/BENCHMARKS.md): the loader and the raw reads each time
    real bytes of the demo's experts and the CLI prints both beside the probe."""
    import random
    import sys

    from edgemoe.bench import loader_random
    from edgemoe.demo import demo_gguf
    from edgemoe.expert_store import find_experts
    from edgemoe.gguf_file import GGUFFile

    path = str(demo_gguf())
    specs = find_experts(GGUFFile(path))
    picks = random.Random(0).sample(sorted(specs), 6)
    assert loader_random.loader_bps(path, specs, picks, 2) > 0
    assert loader_random.loader_bps(path, specs, picks, 2, aio=False) > 0
    assert loader_random.raw_bps(path, specs, picks, 2) > 0
    monkeypatch.setattr(sys, "argv", ["loader_random", path, "--experts", "4"])
    loader_random.main()
    out = capsys.readouterr().out
    assert out.startswith("probe ") and out.count("loader ") == 2 and "raw O_DIRECT" in out
    assert out.count("through reader threads") == 2


def test_a_reading_threads_aio_context_ends_with_the_thread(data_file):
    """The chat reads from a new worker thread per reply: each thread's kernel AIO context is
    destroyed when the thread ends, not kept until the loader closes (fs.aio-nr stays flat)."""
    import gc
    import threading

    path, data = data_file
    loader = ExpertLoader(path, chunk_bytes=64 * 1024)
    try:
        if not loader.uses_aio or not os.path.exists("/proc/sys/fs/aio-nr"):
            pytest.skip("no native AIO here (or no fs.aio-nr to watch)")

        def aio_nr() -> int:
            with open("/proc/sys/fs/aio-nr") as f:
                return int(f.read())

        def reply(out: list) -> None:
            buf = memory_at(*_aligned(2 * BLOCK_BYTES))
            out.append(loader.read_into([(BLOCK_BYTES, 2 * BLOCK_BYTES, 0)], buf) == 2 * BLOCK_BYTES
                       and bytes(buf) == data[BLOCK_BYTES:3 * BLOCK_BYTES])

        before, ok = aio_nr(), []
        for _ in range(5):
            t = threading.Thread(target=reply, args=(ok,))
            t.start()
            t.join()
        gc.collect()
        assert ok == [True] * 5
        assert aio_nr() <= before, "a finished thread's AIO context is still held"
        assert loader.uses_aio
    finally:
        loader.close()
