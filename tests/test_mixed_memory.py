"""`convert --mixed` streams: calibration moves activations one layer at a time and reads one
expert at a time, so peak memory stays far below the checkpoint (a model larger than RAM
converts), bounded by dense weights + activations + a few expert matrices."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from synthetic import write_mixtral

HIDDEN, FF, N_EXPERTS, N_LAYERS, N_TOKENS = 1024, 2048, 8, 4, 512
MATRIX_F32 = HIDDEN * FF * 4  # one expert matrix, 8 MiB
# One expert in flight: its three f32 matrices, a dequantised copy of each for the error of a
# type, the quantised bytes and torch temporaries (~8 matrices), plus the dense weights (the
# temporary f16 GGUF's pages and the f32 checkpoint tensors the writer streams) and the
# calibration activations ([tokens, hidden] a few times, 2 MiB each here), plus allocator slack.
OVERHEAD_BYTES = 64 * 2**20

MEASURE = """
import json, os, sys
import torch
torch.set_num_threads(1)
from gguf import GGMLQuantizationType as QT
from edgemoe.converters.mixed import convert_mixed
from edgemoe.converters.calib_text import CalibrationText
from edgemoe.models.corpus import load_corpus
from edgemoe.tokenizer import Tokenizer  # noqa: F401  (load llama.cpp before the baseline)
import edgemoe.native.quant as q; q.block_size(q.QT.Q8_0)
text = CalibrationText(load_corpus().train[:300], "train[:300]")
def rss(field):
    return int([l for l in open("/proc/self/status") if l.startswith(field + ":")][0].split()[1]) * 1024
base = rss("VmRSS")
open(f"/proc/{os.getpid()}/clear_refs", "w").write("5")
from edgemoe.converters.calibration import calibrate
calib = calibrate(sys.argv[1], text, n_tokens=int(sys.argv[3]), types=(QT.Q6_K, QT.Q8_0), n_threads=1)
calib_peak = rss("VmHWM")
r = convert_mixed(sys.argv[1], sys.argv[2], avg_bits=7.0, dense_type="f16", calibration=calib,
                  types=(QT.Q6_K, QT.Q8_0))
print(json.dumps(dict(base=base, calib_peak=calib_peak, peak=rss("VmHWM"), tokens=calib.n_tokens,
                      experts=len(calib.experts), types=sorted({str(t[0]) for t in r.written.types.values()}))))
"""


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    # experts 1024x2048 f32 = 8 MiB per matrix; 4 layers x 8 experts x 3 = 768 MiB in all
    return write_mixtral(tmp_path_factory.mktemp("big-mixed") / "ckpt", hidden=HIDDEN, ff=FF,
                         n_experts=N_EXPERTS, n_layers=N_LAYERS, seed=3)


@pytest.mark.slow
def test_calibration_and_mixed_conversion_stream_within_a_peak_memory_bound(big_ckpt, tmp_path):
    done = subprocess.run([sys.executable, "-c", MEASURE, str(big_ckpt), str(tmp_path / "m.gguf"), str(N_TOKENS)],
                          capture_output=True, text=True, check=True)
    m = json.loads(done.stdout.strip().splitlines()[-1])
    checkpoint = sum(p.stat().st_size for p in big_ckpt.glob("*.safetensors"))
    experts = N_LAYERS * N_EXPERTS * 3 * MATRIX_F32
    dense = checkpoint - experts
    activations = 6 * N_TOKENS * HIDDEN * 4
    bound = dense + activations + 8 * MATRIX_F32 + OVERHEAD_BYTES
    mib = {k: round(v / 2**20, 1) for k, v in dict(m, checkpoint=checkpoint, bound=bound).items()
           if k not in ("types", "tokens", "experts")}
    print(mib, "calibration growth MiB", round((m["calib_peak"] - m["base"]) / 2**20, 1),
          "total growth MiB", round((m["peak"] - m["base"]) / 2**20, 1))
    assert m["tokens"] == N_TOKENS and m["experts"] == N_LAYERS * N_EXPERTS
    assert len(m["types"]) == 2  # the budget bought some experts q8_0, left others q6_k
    assert bound < checkpoint / 4  # the bound grows with one expert, not with the number of experts or layers
    assert m["calib_peak"] - m["base"] <= bound
    assert m["peak"] - m["base"] <= bound
