"""Measured (never estimated) process memory, from /proc; and the one reader of the byte sizes,
budgets and budget shares users write (2GB, 512MiB, 50%, 100,75,50)."""
from __future__ import annotations

import os
import resource
import sys
from typing import Callable

from edgemoe.errors import InputError


class SizeError(InputError):
    """A byte size, budget or list of budget shares that cannot be read: says which and how to write it."""


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
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: KiB on Linux and BSD, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


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
    """'2GB', '512MiB', '1.5g' or a plain byte count -> bytes (k/m/g/t alone: binary units)."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12, "gb": 10**9, "mb": 10**6,
             "kb": 10**3, "t": 2**40, "g": 2**30, "m": 2**20, "k": 2**10, "b": 1}
    value = None
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                value = int(float(s[: -len(unit)]) * mult)
            except ValueError:
                pass
            break
    if value is None:
        try:
            value = int(s)
        except ValueError:
            raise SizeError(f"cannot read {text!r} as a byte size; write e.g. 2GB, 512MiB or 1500000000") from None
    if value < 0:
        raise SizeError(f"{text!r}: a byte size cannot be negative")
    return value


def parse_budget(text: str, expert_bytes_total: int | Callable[[], int]) -> int:
    """'50%' (of all expert bytes), '8MiB', '2GB' or a plain byte count -> bytes.
    expert_bytes_total may be a function: it is called only for a share (it may read a file)."""
    s = text.strip()
    if not s.endswith("%"):
        return parse_bytes(s)
    try:
        share = float(s[:-1])
    except ValueError:
        raise SizeError(f"cannot read {text!r} as a share; write e.g. 50%") from None
    if not 0 < share <= 100:
        raise SizeError(f"budget share {text!r} must be above 0% and at most 100%")
    total = expert_bytes_total() if callable(expert_bytes_total) else expert_bytes_total
    return int(total * share / 100)


def parse_shares(text: str, flag: str = "--budgets") -> tuple[float, ...]:
    """'100,75,50,25' (percent of all expert bytes) -> (1.0, 0.75, 0.5, 0.25)."""
    shares = []
    for item in text.split(","):
        try:
            pct = float(item.strip().removesuffix("%"))
        except ValueError:
            raise SizeError(f"{flag} {text!r}: cannot read {item.strip()!r} as a percentage; "
                            "write e.g. 100,75,50,25") from None
        if not 0 < pct <= 100:
            raise SizeError(f"{flag} {text!r}: {item.strip()} is not in (0, 100] percent of the expert bytes")
        shares.append(pct / 100)
    return tuple(shares)


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
