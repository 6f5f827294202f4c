"""Per-expert mixed-precision versions of the benchmark slices, in edgemoe's extended layout:
what `edgemoe convert --mixed` writes for a real checkpoint, made for a slice (random weights, no
HF checkpoint), so the engine's speed on a mixed file can be measured at true model dimensions.

    python -m edgemoe.models.mixtral_slice OUT.gguf --layers 8 --mixed-bits 3.4375
    python -m edgemoe.models.qwen3_slice OUT.gguf --layers 16 --mixed-bits 3.4375
    python -m edgemoe.models.qwen3_slice OUT.gguf --layers 16 --mixed-bits 3.4375 --mixed-types repacked --mixed-per layer

The same code as the real converter does the work: the slice is presented to
`converters/extended.write_extended` as an architecture converter (`SliceConverter`), each expert
is one `ExpertSource`, the byte budget comes from `converters/mixed.expert_budget` (3.4375 bits
per weight = q3_k's bytes exactly) and the types from `allocate_types` (`expert_options`, or
`layer_options` with `--mixed-per layer`, then `allocation.allocate`: the multiple-choice
knapsack) on cost(e, t) = importance(e) x rel_error(t). Dense tensors are
the stock slice's (random rows in `--type`, q4_k by default; norms and routers f32).

The expert weights are the stock slice's own: each expert matrix is the slice's random q4_k rows,
dequantised, then quantized in the expert's type (as converting the q4_k slice's weights would).

What stands in for calibration, and why: `calibrate` reads an HF checkpoint, which a slice does
not have, and on random weights the errors and output energies it measures are the same for every
expert up to noise; what differs between a slice's experts is how often they are routed to, which
the proxy takes from the routers directly (random weights have no real importance; this is a
stand-in, not a measurement of one):
- importance(e) = the share of tokens routed to expert e when hidden states are random directions
  (`router_frequencies`: the layer's actual router rows applied to Gaussian vectors, top-k counted).
  The real converter's importance is frequency x mean gate^2 x output energy; on a random slice
  gates and output energies do not differ between experts beyond noise, routing frequency does.
  The slices' router inputs are RMS-normed, so this is the routing a token whose hidden state
  points a random way gets: on the Qwen3-shaped slice it reproduces the real Qwen3-30B-A3B
  run's per-layer skew the router was fitted to (models/qwen3_slice.py), on the Mixtral-shaped
  slice (i.i.d. router rows) it is near-uniform, and so is the allocation there.
- rel_error(t) = relative squared error of quantizing Gaussian matrices of an expert's shapes in
  t (`weight_errors`), the same for every expert: a slice's experts are all row permutations of
  the same random blocks. The real converter measures output error on routed tokens; for random
  weights and inputs the relative output error of a linear map is the relative weight error in
  expectation.
These are stated in the file's `edgemoe.mixed.calibration` key.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_TENSOR as T

from edgemoe.converters.allocation import Allocation
from edgemoe.converters.arch.base import PlannedTensor
from edgemoe.converters.atomic import check_output_path
from edgemoe.converters.calibration import CANDIDATE_TYPES, Calibration, ExpertStats
from edgemoe.converters.convert import ProgressFn
from edgemoe.converters.extended import ExpertSource, ExtendedReport, split_plan, write_extended
from edgemoe.converters.mixed import MixedReport, allocate_types, expert_budget, experts_bytes
from edgemoe.converters.types import parse_output_type
from edgemoe.layout import (KEY_MIXED_BUDGET, KEY_MIXED_ERROR, KEY_MIXED_GAP, KEY_MIXED_SOURCE, KEY_MIXED_TOKENS,
                            ROLES)
from edgemoe.models import demo_dir
from edgemoe.models.slices import SliceSpec, add_hparams, tensor_name
from edgemoe.native.quant import quantize

Key = tuple[int, int]
Q3_K_BITS = 3.4375       # q3_k: 110 bytes per 256 weights, so this many bits is q3_k's expert bytes
ROUTING_SAMPLES = 4096   # random hidden states per layer for the routing frequencies
ERROR_ROWS = 256         # rows of each role's Gaussian matrix quantized to measure each type's error
SOURCE = ("slice proxy, random weights: importance = routing frequency of random hidden directions "
          "through the file's routers; error = relative weight error of each type on Gaussian matrices of "
          "the experts' shapes")


class SliceConverter:
    """A slice, as `write_extended` and `split_plan` read an architecture converter: its
    hyperparameters, the demo's vocabulary, and a plan whose expert tensors yield float rows
    (the stock slice's quantized rows, dequantised) so that each expert can take its own type."""

    def __init__(self, spec: SliceSpec, dense_type: str, vocab_folder: Path):
        self.spec, self.dense_qtype = spec, parse_output_type(dense_type)[0]
        self.arch_name = gguf.MODEL_ARCH_NAMES[spec.arch]
        self.n_layers = spec.shape.n_layers
        self.hp = {"num_experts_per_tok": spec.shape.top_k, "vocab_size": spec.shape.vocab}
        self.ckpt = _VocabCheckpoint(vocab_folder, self.hp)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        add_hparams(w, self.spec)

    def plan(self) -> list[PlannedTensor]:
        return [_as_floats(t) if t.expert_tensor else t for t in self.spec.plan(self.dense_qtype)]


@dataclass(frozen=True)
class _VocabCheckpoint:
    folder: Path     # write_extended names the file after it and reads the tokenizer from it
    config: dict


def _as_floats(t: PlannedTensor) -> PlannedTensor:
    """A stock slice's 3-D expert tensor of quantized rows -> the same tensor as float parts."""
    qtype = t.raw_qtype
    parts = [lambda p=p: gguf.quants.dequantize(p(), qtype).astype(np.float32, copy=False) for p in t.parts]
    return PlannedTensor(t.name, t.shape, parts, layer=t.layer, expert_tensor=True)


def router_frequencies(router: np.ndarray, top_k: int, rng: np.random.Generator,
                       samples: int = ROUTING_SAMPLES) -> np.ndarray:
    """router [n_expert, hidden] -> [n_expert] share of tokens choosing each expert (sums to top_k)
    for hidden states drawn as Gaussian vectors (RMS ~1, as the router's RMS-normed input is)."""
    x = rng.standard_normal((samples, router.shape[1]), dtype=np.float32)
    logits = x @ router.T                                          # [samples, n_expert]
    top = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]   # [samples, top_k]
    return np.bincount(top.ravel(), minlength=router.shape[0]) / samples


def weight_errors(src: ExpertSource, types: tuple[QT, ...] = CANDIDATE_TYPES, seed: int = 0) -> dict[QT, float]:
    """Relative squared error of quantizing Gaussian matrices shaped like `src`'s (ERROR_ROWS rows
    of each role, roles weighted by their parameters) in each type: the error of converting the
    slice's random float weights. (The slice's rows are already q4_k-rounded, so re-quantizing
    them would make q4_k look lossless and every larger type worse.)"""
    rng = np.random.default_rng(seed)
    params = {role: src.shapes[role][0] * src.shapes[role][1] for role in ROLES}
    rows = {role: rng.standard_normal((ERROR_ROWS, src.shapes[role][1]), dtype=np.float32) for role in ROLES}
    out = {}
    for qtype in types:
        err = 0.0
        for role, w in rows.items():
            actual = src.types(qtype)[ROLES.index(role)]  # a row that does not fit takes the writer's fallback
            back = gguf.quants.dequantize(quantize(w, actual), actual)
            err += params[role] * float(((back - w) ** 2).sum() / (w ** 2).sum())
        out[qtype] = err / sum(params.values())
    return out


def proxy_calibration(dense: list[PlannedTensor], experts: dict[Key, ExpertSource], top_k: int,
                      seed: int = 0, types: tuple[QT, ...] = CANDIDATE_TYPES) -> Calibration:
    """The stand-in for `calibrate` (module docstring): per expert its routing frequency as
    importance and the slice's measured error per type."""
    rng = np.random.default_rng(seed)
    by_name = {t.name: t for t in dense}
    errors = weight_errors(experts[min(experts)], types)
    stats = {}
    for layer in sorted({layer for layer, _ in experts}):
        router = by_name[tensor_name(T.FFN_GATE_INP, layer)]
        freq = router_frequencies(router.parts[0]().reshape(router.shape), top_k, rng)
        for e, share in enumerate(freq):
            stats[(layer, e)] = ExpertStats(layer, e, experts[(layer, e)].n_params,
                                            tokens=int(round(share * ROUTING_SAMPLES)), importance=float(share),
                                            rel_error=dict(errors))
    return Calibration(SOURCE, ROUTING_SAMPLES, types, stats)


@dataclass(frozen=True)
class MixedSliceReport(MixedReport):
    q3_k_bytes: int = 0        # the same experts all at q3_k: what the budget is compared with

    def summary(self) -> str:
        types = " ".join(f"{t}x{n}" for t, n in sorted(self.type_counts().items()))
        return (f"{self.written.path}: edgemoe extended layout, not loadable by stock llama.cpp; experts "
                f"{self.written.expert_bytes / 2**20:.1f} MiB ({self.written.expert_bytes / self.q3_k_bytes:.4f}x "
                f"uniform q3_k's {self.q3_k_bytes / 2**20:.1f} MiB; budget {self.budget_bytes / 2**20:.1f} MiB), "
                f"types {types}, allocation {self.allocation.method}, gap {self.allocation.gap:.3g}, "
                f"{self.seconds:.0f} s")


def plan_mixed(conv: SliceConverter, bits: float = Q3_K_BITS, types: tuple[QT, ...] = CANDIDATE_TYPES,
               per: str = "expert") -> tuple[Calibration, Allocation, int, int]:
    """(calibration proxy, allocation, budget bytes, uniform q3_k bytes) for `conv`'s experts, each
    expert (per="expert") or each layer (per="layer") given one of `types`."""
    dense, experts = split_plan(conv.plan())
    budget = expert_budget(experts, avg_bits=bits, types=types)
    calib = proxy_calibration(dense, experts, conv.spec.shape.top_k, types=types)
    return calib, allocate_types(experts, calib, budget, per), budget, experts_bytes(experts, QT.Q3_K)


def write_mixed_slice(out: str | Path, spec: SliceSpec, bits: float = Q3_K_BITS, dense_type: str = "q4_k",
                      on_progress: ProgressFn | None = None, types: tuple[QT, ...] = CANDIDATE_TYPES,
                      per: str = "expert") -> MixedSliceReport:
    """Write `spec` in the extended layout, experts within `bits` bits per weight, atomically
    (types and per as plan_mixed)."""
    start = time.perf_counter()
    out = Path(out)
    check_output_path(out)
    with tempfile.TemporaryDirectory(prefix=".edgemoe-slice-vocab-") as tmp:
        conv = SliceConverter(spec, dense_type, _vocab_folder(Path(tmp), spec.name))
        calib, allocation, budget, q3_k = plan_mixed(conv, bits, types, per)
        extra = {KEY_MIXED_BUDGET: budget, KEY_MIXED_ERROR: allocation.objective, KEY_MIXED_GAP: allocation.gap,
                 KEY_MIXED_SOURCE: calib.source, KEY_MIXED_TOKENS: calib.n_tokens}
        written = write_extended(conv, out, dense_type, dict(allocation.choice), None, extra, on_progress)
    return MixedSliceReport(written, budget, allocation, calib, time.perf_counter() - start, q3_k)


def _vocab_folder(tmp: Path, name: str) -> Path:
    """A folder named after the slice holding links to the demo's tokenizer files: the writer
    names the file (general.name) after its checkpoint folder and reads the vocabulary there."""
    folder = tmp / name
    folder.mkdir()
    for f in demo_dir().iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (folder / f.name).symlink_to(f)
    return folder
