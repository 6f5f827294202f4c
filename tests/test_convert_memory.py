"""Converting streams tensors: peak memory stays near the largest tensor, not the model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from synthetic import write_mixtral

# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a big pytest process would
# report the parent's peak.
MEASURE = """
import os, sys
from edgemoe.converters.convert import convert
import edgemoe.native.quant as q; q.block_size(q.QT.Q8_0)  # load ggml before the baseline
rss_before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
convert(sys.argv[1], sys.argv[2], "f16")
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(rss_before, int(hwm) * 1024)
"""
# Allowed on top of the RSS before converting: the source tensor, its f32 widening, its quantized
# copy and numpy temporaries (3x the largest tensor) plus allocator slack.
OVERHEAD_BYTES = 64 * 2**20


def _rss_before_and_peak(src, out) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out)],
                          capture_output=True, text=True, check=True)
    before, peak = done.stdout.split()[-2:]
    return int(before), int(peak)


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    # experts 1024x2048 f32 = 8 MiB each; 4 layers x 8 experts x 3 = 768 MiB in total
    return write_mixtral(tmp_path_factory.mktemp("big") / "big", hidden=1024, ff=2048, n_experts=8, n_layers=4)


@pytest.mark.slow
def test_peak_memory_is_bounded_by_largest_tensor(big_ckpt, tmp_path):
    baseline, peak = _rss_before_and_peak(big_ckpt, tmp_path / "big.gguf")
    largest = 1024 * 2048 * 4
    total = sum(p.stat().st_size for p in big_ckpt.glob("*.safetensors"))
    assert total > 80 * largest
    growth = peak - baseline
    print(f"baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB, "
          f"checkpoint {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB")
    assert growth <= 3 * largest + OVERHEAD_BYTES


@pytest.mark.slow
def test_sigterm_mid_conversion_leaves_no_partial_file(big_ckpt, tmp_path):
    out = tmp_path / "big.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe.cli", "convert", str(big_ckpt), "-o", str(out),
                             "--type", "q4_k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".partial" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
