"""`edgemoe compress` streams: calibration activations move one decoder layer at a time and only
the experts of the layers in flight (T for the KT-reception field) are in memory, so peak RSS
stays far below the checkpoint (a model larger than RAM compresses). Pruning only: low-rank
factors are handed to the writer all together (see docs/COMPRESSION.md)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from synthetic import write_mixtral

HIDDEN, FF, N_EXPERTS, N_LAYERS, N_TOKENS, BLOCK_T = 512, 1024, 8, 12, 128, 2
MATRIX_F32 = HIDDEN * FF * 4              # 2 MiB
LAYER_EXPERTS = N_EXPERTS * 3 * MATRIX_F32  # 48 MiB: one layer's experts, float32
# torch/allocator slack, the engine's backend buffers, the writer's quantised rows
OVERHEAD_BYTES = 96 * 2**20

MEASURE = """
import json, os, sys
import torch
torch.set_num_threads(1)
from edgemoe.tokenizer import Tokenizer  # noqa: F401  (load llama.cpp before the baseline)
import edgemoe.native.quant as q; q.block_size(q.QT.Q8_0)
from edgemoe.converters.compress.options import CompressOptions
from edgemoe.converters.compress.pipeline import compress, prepare
def rss(field):
    return int([l for l in open("/proc/self/status") if l.startswith(field + ":")][0].split()[1]) * 1024
opts = CompressOptions(prune=0.25, rank_ratio=1.0, population=4, generations=2, keep_k=2, block_t=int(sys.argv[4]),
                       calib_tokens=int(sys.argv[3]), kt_tokens=64, window=64, expert_type="q8_0",
                       dense_type="f16", n_threads=1)
p = prepare(sys.argv[1], sys.argv[2], opts)
base = rss("VmRSS")
open(f"/proc/{os.getpid()}/clear_refs", "w").write("5")
r = compress(p)
print(json.dumps(dict(base=base, peak=rss("VmHWM"), kept=[l["kept_count"] for l in r.report["layers"].values()])))
"""


@pytest.mark.slow
def test_compression_streams_within_a_peak_memory_bound(tmp_path):
    # 12 layers x 8 experts x 3 matrices of 512x1024 f32 = 576 MiB of experts
    big_ckpt = write_mixtral(tmp_path / "ckpt", hidden=HIDDEN, ff=FF, n_experts=N_EXPERTS, n_layers=N_LAYERS, seed=5)
    argv = [sys.executable, "-c", MEASURE, str(big_ckpt), str(tmp_path / "c.gguf"), str(N_TOKENS), str(BLOCK_T)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    checkpoint = sum(p.stat().st_size for p in big_ckpt.glob("*.safetensors"))
    dense = checkpoint - N_LAYERS * LAYER_EXPERTS
    # the pending layers of a KT block, one more being loaded (stack + gate/up concatenation)
    bound = dense + (BLOCK_T + 1) * LAYER_EXPERTS + OVERHEAD_BYTES
    print({k: round(v / 2**20, 1) for k, v in dict(base=m["base"], peak=m["peak"], checkpoint=checkpoint,
                                                     bound=bound).items()},
          "growth MiB", round((m["peak"] - m["base"]) / 2**20, 1))
    assert sum(N_EXPERTS - k for k in m["kept"]) == round(0.25 * N_EXPERTS * N_LAYERS)
    assert bound < checkpoint / 2  # the bound grows with T layers, not with the model
    assert m["peak"] - m["base"] <= bound
