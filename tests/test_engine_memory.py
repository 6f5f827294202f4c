"""Peak RSS of a generate run stays within dense + budget + KV cache + a stated overhead."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgemoe.converters.convert import convert
from synthetic import write_mixtral

# Python + torch + ggml working memory beyond weights, budget and KV cache: measured ~31 MiB here
# (hidden 1024, ff 2048); the bound allows 64 MiB for allocator slack.
OVERHEAD_BYTES = 64 * 2**20

MEASURE = """
import json, os, sys
from edgemoe.engine import Engine, EngineConfig
from edgemoe.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
path, share = sys.argv[1], float(sys.argv[2])
import torch  # noqa: F401  (runtime loaded before the baseline)
from edgemoe.native.backend import CpuBackend
CpuBackend(1).close()
base = current_rss_bytes()
reset_peak_rss()
from edgemoe.expert_store import stock_experts
from edgemoe.gguf_file import GGUFFile
sizes = [s.alloc_bytes for s in stock_experts(GGUFFile(path)).values()]
budget = max(int(sum(sizes) * share), max(sizes))
engine = Engine(path, EngineConfig(budget_bytes=budget, n_ctx=128))
events = list(engine.stream_generate("def f(x):", max_tokens=40, stop_at_eos=False))
dense = sum(t.nbytes for t in engine.file.tensors.values() if not t.is_expert)
print(json.dumps(dict(base=base, peak=peak_rss_bytes(), budget=budget, dense=dense,
                      kv=engine.model.new_kv(128).nbytes, experts=engine.expert_bytes_total,
                      max_resident=max(e.cache.resident_bytes for e in events))))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    ckpt = write_mixtral(d / "ckpt", hidden=1024, ff=2048, n_experts=8, n_layers=4, seed=2)
    return convert(ckpt, d / "big.gguf", "q8_0").path


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.25, 0.5])
def test_peak_rss_within_dense_budget_kv_and_overhead(big_model, share):
    done = subprocess.run([sys.executable, "-c", MEASURE, str(big_model), str(share)],
                          capture_output=True, text=True, check=True)
    m = json.loads(done.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    bound = m["dense"] + m["budget"] + m["kv"] + OVERHEAD_BYTES
    print({k: round(v / 2**20, 1) for k, v in m.items()}, "growth MiB", round(growth / 2**20, 1))
    assert m["max_resident"] <= m["budget"]
    assert m["experts"] > m["budget"] + OVERHEAD_BYTES  # the bound would fail if all experts were resident
    assert growth <= bound
