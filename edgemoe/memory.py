"""Measured (never estimated) process memory, from /proc."""
from __future__ import annotations

import os
import resource


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parse_bytes(text: str | int) -> int:
    """'2GB', '512MiB', '1.5g', '100%'-free numbers -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12, "gb": 10**9, "mb": 10**6,
             "kb": 10**3, "t": 2**40, "g": 2**30, "m": 2**20, "k": 2**10, "b": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a byte size; write e.g. 2GB, 512MiB or 1500000000") from None


def parse_budget(text: str, expert_bytes_total: int) -> int:
    """'50%' (of all expert bytes), '8MiB', '2GB' or a plain byte count -> bytes."""
    s = text.strip()
    if s.endswith("%"):
        try:
            return int(expert_bytes_total * float(s[:-1]) / 100)
        except ValueError:
            raise ValueError(f"cannot read {text!r} as a share; write e.g. 50%") from None
    return parse_bytes(s)


def return_large_frees_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations of at least `threshold_bytes` with mmap, so freeing them returns the
    memory at once. glibc raises its mmap threshold each time such a block is freed (up to 32 MiB),
    after which layer-sized tensors come from the heap and fragment it: streaming compression of
    the same checkpoint peaked 181-338 MiB above its start from run to run, and 178 MiB every time
    with the threshold fixed (tests/test_compress_memory.py). Process-wide; False off glibc."""
    import ctypes
    import ctypes.util

    M_MMAP_THRESHOLD = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
