"""A CI-sized soak (edgemoe/bench/soak.py): a minute of generation on the demo model at a quarter of
its expert bytes (LRU, prefetch on, the engine reopened every few prompts) in a fresh process;
after the warm-up, resident memory stays within a small bound and no file descriptor or thread is
left behind. The 30-minute run and its numbers are in docs/RELIABILITY.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SOAK_MINUTES = float(os.environ.get("EDGEMOE_SOAK_MINUTES", "1"))
# RSS climbs for the first ~5 minutes (allocator arenas of the main and prefetch threads, graph
# and KV buffers of varying sizes), then stays flat (docs/RELIABILITY.md: the 12-minute run). The
# CI run takes its baseline half-way and measured 9.1 MiB after it. A leak per expert miss
# (~0.4 MiB, >10,000 misses after the baseline), per prompt (~40 after it) or per engine reopen
# (~8 MiB, ~5 after it) would pass the bound by far.
RSS_GROWTH_MIB = 24.0


@pytest.mark.slow
def test_soak_has_no_growth_in_memory_fds_or_threads():
    done = subprocess.run([sys.executable, "-m", "edgemoe.bench.soak", "--minutes", str(SOAK_MINUTES), "--json",
                           "--sample-every", "2", "--reopen-every", "8", "--warmup-share", "0.5", "--max-rss-growth-mib", str(RSS_GROWTH_MIB)],
                          capture_output=True, text=True, timeout=60 * SOAK_MINUTES + 300)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    s = out["summary"]
    print(s)
    assert s["tokens"] > 200 and s["prompts"] > 8 and s["reopens"] >= 1
    assert s["misses"] > 0 and s["read_mib"] > 0, "a tight budget reads experts"
    assert s["fd_growth"] <= 0 and s["thread_growth"] <= 0
    assert s["rss_growth_mib"] <= RSS_GROWTH_MIB
    assert done.returncode == 0, done.stderr[-2000:]
