"""A memory cgroup around one child process: a hard cap, its peak usage and its OOM kills.

cgroup v2 where the memory controller is on the unified hierarchy and the group can be made,
else cgroup v1's memory hierarchy. The group is made below the cgroup this process is in (so
any limit above us still applies and the machinery that placed us keeps seeing our usage),
the child joins it before it runs anything (`sh -c 'echo $$ > cgroup.procs; exec ...'`), and
the group is removed once the child has exited. Page cache the child reads is charged to the
group, so a capped run cannot borrow the file's pages from outside its cap.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgemoe.errors import EdgemoeError

V1_MOUNT = Path("/sys/fs/cgroup/memory")
V2_MOUNTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class CgroupError(EdgemoeError):
    """No memory cgroup could be made (not root, read-only, no memory controller)."""


@dataclass(frozen=True)
class CgroupUsage:
    peak_bytes: int        # v1 memory.max_usage_in_bytes, v2 memory.peak (0 where the kernel lacks it)
    oom_kills: int         # processes the kernel's OOM killer killed in the group
    limit_bytes: int       # as the kernel holds it (rounded down to pages)


class MemoryCgroup:
    """One memory cgroup with a hard limit; `limit_bytes=None` makes an uncapped group (peak only)."""

    def __init__(self, path: Path, version: int, limit_bytes: int | None):
        self.path, self.version, self.limit_bytes = path, version, limit_bytes

    @classmethod
    def create(cls, name: str, limit_bytes: int | None, root: Path | None = None) -> "MemoryCgroup":
        """Make `<root>/<name>`; root defaults to this process's own memory cgroup (v2 first, then
        v1). Raises CgroupError with what to do when no group can be made."""
        if root is not None:
            return cls._make(Path(root), name, limit_bytes, 2 if (Path(root) / "cgroup.controllers").exists() else 1)
        errors = []
        for parent, version in _candidate_parents():
            try:
                return cls._make(parent, name, limit_bytes, version)
            except CgroupError as exc:
                errors.append(str(exc))
        raise CgroupError("cannot make a memory cgroup: " + ("; ".join(errors) or
                          "no cgroup v2 memory controller and no cgroup v1 memory hierarchy is mounted"))

    @classmethod
    def _make(cls, parent: Path, name: str, limit_bytes: int | None, version: int) -> "MemoryCgroup":
        if not (parent / "cgroup.procs").exists():
            raise CgroupError(f"{parent} is not a cgroup folder (no cgroup.procs)")
        if version == 2 and "memory" not in _read(parent / "cgroup.subtree_control").split():
            try:
                _write(parent / "cgroup.subtree_control", "+memory")
            except OSError as exc:
                raise CgroupError(f"cannot enable the memory controller below {parent}: {exc.strerror}") from None
        path = parent / name
        try:
            path.mkdir()
        except OSError as exc:
            raise CgroupError(f"cannot make cgroup {path}: {exc.strerror or exc}; run as root on a machine "
                              "whose cgroup filesystem is writable") from None
        group = cls(path, version, limit_bytes)
        try:
            group._set_limit()
        except OSError as exc:
            group.remove()
            raise CgroupError(f"cannot set the memory limit of {path}: {exc.strerror or exc}") from None
        return group

    def _set_limit(self) -> None:
        if self.version == 2:
            _write(self.path / "memory.max", "max" if self.limit_bytes is None else str(self.limit_bytes))
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", "0")  # a cap that swaps out is not a cap
            return
        if self.limit_bytes is None:
            return
        _write(self.path / "memory.limit_in_bytes", str(self.limit_bytes))
        if (self.path / "memory.memsw.limit_in_bytes").exists():  # memory + swap, set after the memory limit
            _write(self.path / "memory.memsw.limit_in_bytes", str(self.limit_bytes))
        held = int(_read(self.path / "memory.limit_in_bytes"))
        if held > self.limit_bytes:
            raise OSError(0, f"the kernel holds a limit of {held} bytes, above the {self.limit_bytes} asked")

    @property
    def procs_path(self) -> Path:
        return self.path / "cgroup.procs"

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside the group from its first instruction: the shell joins, then execs."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_path), *argv]

    def usage(self) -> CgroupUsage:
        if self.version == 2:
            peak = _read(self.path / "memory.peak") if (self.path / "memory.peak").exists() else "0"
            events = _keyed(_read(self.path / "memory.events"))
            limit = _read(self.path / "memory.max")
            return CgroupUsage(int(peak), events.get("oom_kill", 0), -1 if limit == "max" else int(limit))
        control = _keyed(_read(self.path / "memory.oom_control"))
        return CgroupUsage(int(_read(self.path / "memory.max_usage_in_bytes")), control.get("oom_kill", 0),
                           int(_read(self.path / "memory.limit_in_bytes")))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in _read(self.procs_path).split()]
        except OSError:
            return []

    def remove(self, wait_s: float = 5.0) -> None:
        """rmdir once no process is left (an exiting child leaves the group a moment later)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise CgroupError(f"cgroup {self.path} still holds processes {self.pids()}; "
                                      "remove it by hand once they exit (rmdir)") from None
                time.sleep(0.05)


def _candidate_parents() -> list[tuple[Path, int]]:
    """This process's memory cgroup, on v2 (if its memory controller is there) then on v1."""
    own = _own_cgroups()
    out = []
    for mount in V2_MOUNTS:
        if (mount / "cgroup.controllers").exists() and "memory" in _read(mount / "cgroup.controllers").split():
            out.append((mount / own.get("", "/").lstrip("/"), 2))
            break
    if (V1_MOUNT / "cgroup.procs").exists():
        out.append((V1_MOUNT / own.get("memory", "/").lstrip("/"), 1))
    return out


def _own_cgroups() -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}; the v2 entry is keyed ''."""
    out = {}
    try:
        for line in _read(Path("/proc/self/cgroup")).splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _keyed(text: str) -> dict[str, int]:
    """'oom_kill 2\\nunder_oom 0' -> {'oom_kill': 2, 'under_oom': 0}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
