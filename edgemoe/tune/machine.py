"""What this machine gives a model: cores, RAM, GPUs, and how fast the model file's experts read.

Read speeds are measured on the model file itself, two ways: `warm` as the engine reads a miss
(pread of one expert into fresh aligned memory and wrapping it as ggml tensors, with the file's
pages in the page cache) and `cold` from the disk (O_DIRECT, 1 MiB blocks, the page cache
bypassed). A laptop whose RAM cannot also hold the file as page cache reads some misses cold.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgemoe.dma_buffers import aligned_anonymous
from edgemoe.expert_store import ExpertSpec, read_expert

BLOCK_BYTES = 2**20


@dataclass(frozen=True)
class MachineInfo:
    cores: int                    # usable by this process (CPU affinity)
    ram_total_bytes: int
    ram_available_bytes: int      # MemAvailable when probed: free + reclaimable page cache
    gpus: tuple[str, ...]         # found on the machine; the engine computes on `ggml_backends`
    ggml_backends: tuple[str, ...]
    read_warm_bps: float          # engine miss path, file pages cached
    read_cold_bps: float          # from disk, page cache bypassed; 0.0 when it could not be measured
    read_cold_method: str         # "O_DIRECT", "fadvise" or "unmeasured"
    read_sample_bytes: int


def meminfo_bytes() -> dict[str, int]:
    """/proc/meminfo fields in bytes (empty where there is no /proc)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def find_gpus() -> tuple[str, ...]:
    """NVIDIA cards (nvidia-smi) and integrated/discrete GPUs seen by the kernel's DRM."""
    found: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout
            found += [f"NVIDIA {line.strip()}" for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    vendors = {"0x8086": "Intel", "0x1002": "AMD", "0x10de": "NVIDIA", "0x106b": "Apple"}
    for card in sorted(Path("/sys/class/drm").glob("card[0-9]")):
        try:
            vendor = (card / "device" / "vendor").read_text().strip()
        except OSError:
            continue
        if vendor in vendors and not (vendor == "0x10de" and any(g.startswith("NVIDIA") for g in found)):
            found.append(f"{vendors[vendor]} GPU ({card.name})")
    return tuple(found)


def sample_experts(specs: dict, target_bytes: int, min_count: int = 4) -> list[ExpertSpec]:
    """Experts spread evenly over the file, at least `min_count`, about `target_bytes` in all."""
    ordered = [specs[k] for k in sorted(specs)]
    if not ordered:
        return []
    size = max(ordered[0].alloc_bytes, 1)
    n = min(len(ordered), max(min_count, target_bytes // size))
    step = len(ordered) / n
    return [ordered[int(i * step)] for i in range(n)]


def read_warm_bps(path: str | os.PathLike, experts: list[ExpertSpec], repeats: int = 2) -> float:
    """Bytes/s of the engine's miss path with the file's pages cached (the first pass caches them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for spec in experts:
            read_expert(fd, spec, size).close()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for spec in experts:
                read_expert(fd, spec, size).close()
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    nbytes = repeats * sum(p.nbytes for s in experts for p in s.parts)
    return nbytes / max(elapsed, 1e-9)


def read_cold_bps(path: str | os.PathLike, start: int, length: int, max_s: float = 2.0, streams: int = 1,
                  block_bytes: int = BLOCK_BYTES) -> tuple[float, str]:
    """Bytes/s from the disk over [start, start+length): O_DIRECT, else after dropping the pages
    with posix_fadvise (does not touch pages other processes hold dirty). `streams` threads read
    `block_bytes` blocks in turn, so up to `streams` reads are in flight: queue depth decides
    what a disk gives (here one 1 MiB O_DIRECT stream 0.77 GB/s, four of 8 MiB 2.8 GB/s)."""
    start -= start % block_bytes
    for method in ("O_DIRECT", "fadvise"):
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if method == "O_DIRECT" else 0)
        if method == "O_DIRECT" and not hasattr(os, "O_DIRECT"):
            continue
        try:
            fd = os.open(path, flags)
        except OSError:
            continue
        try:
            if method == "fadvise":
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
            done, elapsed = _read_blocks(fd, start, length, max_s, streams, block_bytes)
            if done:
                return done / max(elapsed, 1e-9), method
        except (OSError, AttributeError):
            continue
        finally:
            os.close(fd)
    return 0.0, "unmeasured"


def _read_blocks(fd: int, start: int, length: int, max_s: float, streams: int, block_bytes: int) -> tuple[int, float]:
    """(bytes read, seconds): `streams` threads take the next block until `length` or `max_s`."""
    next_block, done, errors = iter(range(start, start + length, block_bytes)), [0], []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def stream() -> None:
        # page-aligned as O_DIRECT requires, and huge pages as the expert loader's destinations
        # (edgemoe/dma_buffers.py): the probe measures what the disk gives those reads
        memory, at = aligned_anonymous(block_bytes)
        buf = memoryview(memory)[at:at + block_bytes]
        try:
            while time.perf_counter() - t0 < max_s:
                with lock:
                    offset = next(next_block, None)
                if offset is None:
                    return
                n = os.preadv(fd, [buf], offset)
                if n <= 0:
                    return
                with lock:
                    done[0] += n
        except OSError as exc:
            errors.append(exc)
        finally:
            buf.release()
            memory.close()

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(max(streams, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors and not done[0]:
        raise errors[0]
    return done[0], time.perf_counter() - t0


def probe_machine(path: str | os.PathLike, specs: dict, sample_bytes: int = 256 * 2**20) -> MachineInfo:
    from edgemoe.native.backend import available_backends

    mem = meminfo_bytes()
    experts = sample_experts(specs, sample_bytes)
    warm = read_warm_bps(path, experts) if experts else 0.0
    if specs:
        first = min(p.offset for s in specs.values() for p in s.parts)
        last = max(p.offset + p.nbytes for s in specs.values() for p in s.parts)
        cold, method = read_cold_bps(path, first, min(last - first, sample_bytes))
    else:
        cold, method = 0.0, "unmeasured"
    try:
        backends = tuple(available_backends())
    except Exception:  # a broken native build is reported by the engine itself, not by the probe
        backends = ("cpu",)
    return MachineInfo(usable_cores(), mem.get("MemTotal", 0), mem.get("MemAvailable", mem.get("MemFree", 0)),
                       find_gpus(), backends, warm, cold, method,
                       sum(p.nbytes for s in experts for p in s.parts))
