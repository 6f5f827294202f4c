"""Loader destinations get transparent huge pages where the kernel grants them to madvised
memory (edgemoe/dma_buffers.py): that is what lets O_DIRECT reads go out as 4 MiB requests."""
from pathlib import Path

import numpy as np
import pytest

from edgemoe.dma_buffers import HUGE_PAGE, address_of, aligned_anonymous
from edgemoe.llama_pages import map_anonymous, unmap

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    text = THP.read_text() if THP.exists() else "[never]"
    return text[text.index("[") + 1:text.index("]")]


def anon_huge_bytes() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def test_aligned_anonymous_is_aligned_and_usable():
    memory, start = aligned_anonymous(5 * HUGE_PAGE + 4096)
    assert (address_of(memory) + start) % HUGE_PAGE == 0
    view = np.frombuffer(memory, dtype=np.uint8, count=5 * HUGE_PAGE + 4096, offset=start)
    view[:] = 7
    assert int(view.sum()) == 7 * view.size
    del view
    memory.close()
    small, at = aligned_anonymous(4096)
    assert at == 0 and len(small) == 4096
    small.close()


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_touched_buffers_are_huge_pages():
    before = anon_huge_bytes()
    memory, start = aligned_anonymous(8 * HUGE_PAGE)
    view = np.frombuffer(memory, dtype=np.uint8, count=8 * HUGE_PAGE, offset=start)
    view[:] = 1
    assert anon_huge_bytes() - before >= 4 * HUGE_PAGE  # the kernel may refuse a few under fragmentation
    del view
    memory.close()


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_populated_slots_are_aligned_huge_pages():
    before = anon_huge_bytes()
    size = 6 * HUGE_PAGE + 3 * 4096  # an expert's interior is rarely a whole number of huge pages
    addr = map_anonymous(size)
    try:
        assert addr % HUGE_PAGE == 0
        assert anon_huge_bytes() - before >= 3 * HUGE_PAGE
    finally:
        unmap(addr, size)
