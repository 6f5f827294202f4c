"""The expert loader alone on cold random experts, against raw reads of the same bytes: what the
disk gives an engine's misses when nothing else runs (docs/BENCHMARKS.md, "Prefetch under the cap").

    python -m edgemoe.bench.loader_random MODEL.gguf [--experts 240] [--seed 1]

For k = 1 and 2 experts per request (a layer's misses): the page cache is dropped, then random
experts are read through `ExpertLoader.read_many` into their layout in huge-page buffers (as the
engine's arena frames), once through native AIO and once through the reader threads, and the
same experts' parts with plain threads issuing one O_DIRECT `preadv` per part over its enclosing
4 KiB blocks (no loader, no bounce copy: the disk's limit for this pattern). Prints GB/s of each
beside the capped bench's probe (4 streams of 8 MiB blocks).
"""
from __future__ import annotations

import argparse
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from edgemoe.dma_buffers import aligned_anonymous
from edgemoe.expert_loader import ExpertLoader, bounce_span, spec_ranges
from edgemoe.expert_store import find_experts
from edgemoe.gguf_file import GGUFFile


HUGE_PAGE = 2 * 2**20


def _buffers(n: int, nbytes: int) -> list[memoryview]:
    """n page-aligned buffers of nbytes, each in whole huge pages (O_DIRECT into 4 KiB pages ran
    at 1.4 GB/s here, into huge pages 3.4: the kernel pins every destination page), touched once."""
    out = []
    for _ in range(n):
        memory, at = aligned_anonymous(-(-nbytes // HUGE_PAGE) * HUGE_PAGE)
        view = memoryview(memory)[at:at + nbytes]
        view[:] = bytes(nbytes)
        out.append(view)
    return out


def _drop(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def loader_bps(path: str, specs: dict, picks: list, per_request: int, aio: bool = True) -> float:
    size = max(s.layout()[0] for s in specs.values())
    buffers = _buffers(per_request, size)
    _drop(path)
    loader = ExpertLoader(path, aio=aio)
    try:
        for i in range(0, len(picks), per_request):
            loader.read_many([(spec_ranges(specs[k]), buf) for k, buf in zip(picks[i:i + per_request], buffers)])
        return loader.stats().bandwidth_bps
    finally:
        loader.close()


def raw_bps(path: str, specs: dict, picks: list, per_request: int) -> float:
    parts = [[p for k in picks[i:i + per_request] for p in specs[k].parts] for i in range(0, len(picks), per_request)]
    widest = max(bounce_span(p.offset, p.nbytes)[1] for group in parts for p in group)
    buffers = _buffers(max(len(g) for g in parts), widest)
    _drop(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

    def read(job) -> int:
        buf, p = job
        lo, span = bounce_span(p.offset, p.nbytes)
        os.preadv(fd, [buf[:span]], lo)
        return p.nbytes

    try:
        with ThreadPoolExecutor(len(buffers)) as pool:
            start, total = time.perf_counter(), 0
            for group in parts:
                total += sum(pool.map(read, zip(buffers, group)))
            return total / (time.perf_counter() - start)
    finally:
        os.close(fd)


def main() -> None:
    from edgemoe.bench.capped import PROBE_BLOCK_BYTES, PROBE_MAX_S, PROBE_STREAMS
    from edgemoe.tune.machine import read_cold_bps

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--experts", type=int, default=240, help="random experts per measurement (default 240)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    specs = find_experts(GGUFFile(a.model))
    rng = random.Random(a.seed)
    probe, method = read_cold_bps(a.model, 0, os.path.getsize(a.model), PROBE_MAX_S, PROBE_STREAMS, PROBE_BLOCK_BYTES)
    print(f"probe {probe / 1e9:.2f} GB/s ({method}, {PROBE_STREAMS} streams of {PROBE_BLOCK_BYTES >> 20} MiB)")
    for per_request in (1, 2):
        picks = rng.sample(sorted(specs), min(a.experts, len(specs)))
        aio = loader_bps(a.model, specs, picks, per_request, aio=True)
        threads = loader_bps(a.model, specs, picks, per_request, aio=False)
        raw = raw_bps(a.model, specs, picks, per_request)
        print(f"{per_request} expert(s) per request: loader {aio / 1e9:.2f} GB/s ({aio / probe:.0%} of the probe; "
              f"native AIO where the kernel has it), through reader threads {threads / 1e9:.2f} GB/s "
              f"({threads / probe:.0%}), raw O_DIRECT {raw / 1e9:.2f} GB/s ({raw / probe:.0%})")


if __name__ == "__main__":
    main()
