"""Calibration for per-expert mixed precision: run the model on calibration text, layer by layer,
and measure per (layer, expert) what the bit allocation needs.

The dense path is the engine's own (edgemoe/arch/*.py, so every architecture it runs is
covered) over a temporary GGUF holding only the dense tensors in f16; the experts are read from
the HF checkpoint one at a time and run in float32 torch. Activations of every calibration
token move through one layer at a time (GPTQ-style), so peak memory is the activations
([tokens, hidden] a few times) + the dense weights + one expert, not the model.

Per expert: routing frequency, mean gate weight, output energy, the importance matrix of its
inputs (llama.cpp's imatrix: mean squared activation per input column, for gate/up and for down)
and, for every candidate type, the measured relative output error after quantizing the three
matrices, without the imatrix (mode "never", the default), with it ("always"), or both, keeping
the lower ("auto"). The error tokens are held out of the imatrix they are measured with, so an
imatrix is not judged on the tokens it was fitted to. "never" is the default because on the
demo model the imatrix did not lower held-out KL end to end (q2_k: 0.0033 with, 0.0021
without; q3_k/q4_k: equal), although it lowers most experts' measured output MSE at q3_k and up
(docs/BENCHMARKS.md). The expected error an expert adds to its layer's output is
    cost(e, type) = importance(e) * rel_error(e, type)
    importance(e) = sum over tokens routed to e of g^2 * |y|^2        (g: gate weight, y: output)
    rel_error(e, type) = sum g^2 |y_q - y|^2 / sum g^2 |y|^2         (on up to error_tokens of them)
(errors of different experts are assumed uncorrelated, so costs add).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import gguf.quants
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from edgemoe.converters.arch import converter_for
from edgemoe.converters.calib_text import CalibrationText, calibration_text, check_enough
from edgemoe.converters.convert import write_gguf
from edgemoe.converters.extended import ExpertSource, split_plan
from edgemoe.converters.hf_checkpoint import HFCheckpoint
from edgemoe.converters.vocab import write_vocab
from edgemoe.layout import ROLES
from edgemoe.native.quant import quantize

CANDIDATE_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0)
CHUNK_TOKENS = 2048  # tokens per expert matmul: bounds the [tokens, ff] intermediate
IMATRIX_MODES = ("auto", "always", "never")
Key = tuple[int, int]
ProgressFn = Callable[[int, int, str], None]  # (experts done, total, label)


@dataclass
class ExpertStats:
    layer: int
    expert: int
    n_params: int
    tokens: int = 0            # token slots routed to the expert
    gate_sum: float = 0.0
    energy: float = 0.0        # sum |y|^2 over routed tokens
    importance: float = 0.0    # sum g^2 |y|^2
    input_sq: np.ndarray | None = None  # [D] sum x^2: imatrix of gate and up
    mid_sq: np.ndarray | None = None    # [F] sum h^2: imatrix of down
    rel_error: dict[QT, float] = field(default_factory=dict)
    with_imatrix: dict[QT, bool] = field(default_factory=dict)  # the error above is with the imatrix

    def mean_gate(self) -> float:
        return self.gate_sum / self.tokens if self.tokens else 0.0

    def mean_energy(self) -> float:
        return self.energy / self.tokens if self.tokens else 0.0

    def imatrix(self) -> dict[str, np.ndarray] | None:
        """role -> float32 [cols] column importance (mean squared input), None if never routed."""
        if not self.tokens:
            return None
        inp, mid = _floored(self.input_sq / self.tokens), _floored(self.mid_sq / self.tokens)
        return {"gate": inp, "up": inp, "down": mid}

    def cost(self, qtype: QT) -> float:
        return self.importance * self.rel_error.get(qtype, 0.0)


@dataclass
class Calibration:
    source: str
    n_tokens: int
    types: tuple[QT, ...]
    experts: dict[Key, ExpertStats]
    seconds: float = 0.0
    imatrix: str = "never"  # how errors were measured: "auto" (with and without), "always", "never"

    def imatrices(self, choice: dict[Key, QT] | None = None, mode: str = "auto") -> dict[Key, dict[str, np.ndarray]]:
        """Importance matrices to quantize with: "always" every expert's, "never" none, "auto" an
        expert's where its measured error in the chosen type was lower with it."""
        if mode not in IMATRIX_MODES:
            raise ValueError(f"imatrix mode {mode!r}: choose one of {', '.join(IMATRIX_MODES)}")
        out = {}
        for key, st in self.experts.items():
            im = st.imatrix()
            if im is None or mode == "never":
                continue
            if mode == "always" or (choice is not None and st.with_imatrix.get(choice[key], False)):
                out[key] = im
        return out

    def frequency(self, key: Key) -> float:
        """Share of calibration tokens routed to the expert."""
        return self.experts[key].tokens / self.n_tokens if self.n_tokens else 0.0


def _floored(v: np.ndarray) -> np.ndarray:
    # a column that never saw a non-zero input would get weight 0: keep every weight positive
    v = v.astype(np.float32)
    return np.maximum(v, 1e-6 * float(v.mean()) + 1e-12)


def calibrate(hf_dir: str | Path, text: CalibrationText | None = None, n_tokens: int = 8192, window: int = 256,
              types: tuple[QT, ...] = CANDIDATE_TYPES, error_tokens: int = 512, work_dir: str | Path | None = None,
              n_threads: int | None = None, seed: int = 0, imatrix: str = "never",
              on_progress: ProgressFn | None = None) -> Calibration:
    """Calibrate the checkpoint in `hf_dir` on `text` (default: the demo corpus's train split).
    imatrix: measure each type's error quantizing with the importance matrices and without
    ("auto", keeping the lower), only with ("always") or only without ("never")."""
    if imatrix not in IMATRIX_MODES:
        raise ValueError(f"imatrix mode {imatrix!r}: choose one of {', '.join(IMATRIX_MODES)}")
    start = time.perf_counter()
    conv = converter_for(HFCheckpoint(hf_dir))
    dense, experts = split_plan(conv.plan())
    text = text or calibration_text(None)
    torch_threads = torch.get_num_threads()
    try:
        if n_threads:  # torch's own pool too: oversubscribed cores make its matmuls several times slower
            torch.set_num_threads(n_threads)
        with tempfile.TemporaryDirectory(dir=work_dir, prefix=".edgemoe-calibration-") as tmp:
            path = Path(tmp) / "dense.gguf"
            _write_dense(conv, dense, path)
            n, stats = _run(path, text, experts, n_tokens, window, types, error_tokens, n_threads, seed,
                            imatrix, on_progress)
    finally:
        torch.set_num_threads(torch_threads)
    return Calibration(text.source, n, tuple(types), stats, time.perf_counter() - start, imatrix)


def _write_dense(conv, dense, path: Path) -> None:
    w = gguf.GGUFWriter(path=None, arch=conv.arch_name)
    conv.write_hparams(w)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    write_vocab(w, conv.ckpt.folder, int(conv.ckpt.config["vocab_size"]))
    write_gguf(w, dense, QT.F16, path)


def _run(path, text, experts, n_tokens, window, types, error_tokens, n_threads, seed, imatrix,
         on_progress) -> tuple[int, dict[Key, ExpertStats]]:
    from edgemoe.arch import model_class
    from edgemoe.gguf_file import GGUFFile
    from edgemoe.layers import rms_norm
    from edgemoe.moe import MoEBlock, SharedExpertMoE
    from edgemoe.native.backend import CpuBackend
    from edgemoe.tokenizer import Tokenizer

    model_file = GGUFFile(path)
    window = min(window, int(model_file.arch_field("context_length", window)))
    windows = token_windows(Tokenizer(path), text, n_tokens, window)
    backend = CpuBackend(n_threads)
    model = model_class(model_file.arch)(model_file, backend, None)
    stats: dict[Key, ExpertStats] = {}
    rng = np.random.default_rng(seed)
    done, total = 0, len(experts)
    with torch.no_grad():
        x = torch.cat([model.embed(w) for w in windows])  # [N, D], windows back to back
        bounds = np.cumsum([0] + [len(w) for w in windows])
        kv = model.new_kv(max(len(w) for w in windows))
        eps = model.args.eps
        for layer, (attn_norm, attn, ffn_norm, ffn) in enumerate(model.layers):
            for a, b in zip(bounds[:-1], bounds[1:]):  # attention within each window, from position 0
                x[a:b] += attn(rms_norm(x[a:b], attn_norm, eps), kv, 0)
            xn = rms_norm(x, ffn_norm, eps)
            if isinstance(ffn, (MoEBlock, SharedExpertMoE)):
                block = ffn.moe if isinstance(ffn, SharedExpertMoE) else ffn
                layer_experts = {e: src for (l, e), src in experts.items() if l == layer}

                def progress(label: str) -> None:
                    nonlocal done
                    done += 1
                    if on_progress:
                        on_progress(done, total, label)

                y = moe_calibration(block, xn, layer_experts, stats, types, error_tokens, rng, progress, imatrix)
                if isinstance(ffn, SharedExpertMoE):
                    y += ffn.shared_part(xn)
            else:
                y = ffn(xn)  # a dense FFN layer (DeepSeek's leading layers)
            x += y
            del xn, y
    backend.close()
    return sum(len(w) for w in windows), stats


def token_windows(tokenizer, text: CalibrationText, n_tokens: int, window: int) -> list[list[int]]:
    """Non-overlapping windows of the `EOS doc EOS doc ...` stream (as the demo was trained), spread
    evenly over the whole stream, n_tokens in all where the text has that many."""
    stream: list[int] = []
    for doc in text.documents:
        stream.append(tokenizer.eos)
        stream.extend(tokenizer.encode(doc, add_bos=False))
    check_enough(len(stream), text.source)
    if len(stream) <= window:
        return [stream]
    n_windows = max(1, min(n_tokens // window, len(stream) // window))
    starts = np.linspace(0, len(stream) // window - 1, n_windows).round().astype(int) * window
    return [stream[s:s + window] for s in starts]


def moe_calibration(block, x: torch.Tensor, experts: dict[int, ExpertSource], stats: dict, types, error_tokens: int,
                    rng: np.random.Generator, progress: Callable[[str], None],
                    imatrix: str = "never") -> torch.Tensor:
    """The routed-expert output of `block` for x [N, D] in float32, recording each expert's stats."""
    from edgemoe.moe import route

    weights, ids = route(x @ block.router.T, block.cfg)  # [N, k] each
    out = torch.zeros_like(x)
    for e, src in sorted(experts.items()):
        st = stats[(src.layer, e)] = ExpertStats(src.layer, e, src.n_params)
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if len(tok):
            w = {role: src.load(role) for role in ROLES}  # float32 [rows, cols]
            g = weights[tok, slot]
            _measure(st, w, x, tok, g, out)
            n_eval = min(error_tokens, len(tok) // 2) or len(tok)  # the rest fit the imatrix it is tried with
            sample = np.sort(rng.choice(len(tok), n_eval, replace=False))
            _measure_errors(st, w, x[tok[sample]], g[sample], types, imatrix)
            del w
        progress(f"layer {src.layer} expert {e}")
    return out


def _ffn(w: dict[str, torch.Tensor], xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU expert: xs [n, D] -> (h [n, F], y [n, D])."""
    h = torch.nn.functional.silu(xs @ w["gate"].T) * (xs @ w["up"].T)
    return h, h @ w["down"].T


def _measure(st: ExpertStats, w: dict[str, np.ndarray], x, tok, g, out) -> None:
    wt = {role: torch.from_numpy(m) for role, m in w.items()}
    st.input_sq = np.zeros(x.shape[1], np.float64)
    st.mid_sq = np.zeros(w["down"].shape[1], np.float64)
    for c in range(0, len(tok), CHUNK_TOKENS):
        t, gc = tok[c:c + CHUNK_TOKENS], g[c:c + CHUNK_TOKENS]
        xs = x[t]
        h, y = _ffn(wt, xs)
        e2 = (y * y).sum(1)  # [n]
        st.tokens += len(t)
        st.gate_sum += float(gc.sum())
        st.energy += float(e2.sum())
        st.importance += float((gc * gc * e2).sum())
        st.input_sq += (xs * xs).sum(0).double().numpy()
        st.mid_sq += (h * h).sum(0).double().numpy()
        out.index_add_(0, t, y * gc[:, None])


def _measure_errors(st: ExpertStats, w: dict[str, np.ndarray], xs: torch.Tensor, g: torch.Tensor, types,
                    mode: str) -> None:
    wt = {role: torch.from_numpy(m) for role, m in w.items()}
    h, y = _ffn(wt, xs)
    g2 = (g * g)[:, None]
    ref = float((g2 * y * y).sum())
    n_fit = st.tokens - len(xs)
    if n_fit > 0:  # the imatrix of the routed tokens outside the error sample
        inp = _floored((st.input_sq - (xs * xs).sum(0).double().numpy()) / n_fit)
        fit = {"gate": inp, "up": inp, "down": _floored((st.mid_sq - (h * h).sum(0).double().numpy()) / n_fit)}
    else:
        fit = st.imatrix()
    tries = {"auto": (False, True), "always": (True,), "never": (False,)}[mode]
    for qtype in types:
        errors = {}
        for use in tries:
            wq = {role: torch.from_numpy(dequantized(m, _fit(qtype, m.shape[1]), fit[role] if use else None))
                  for role, m in w.items()}
            _, yq = _ffn(wq, xs)
            errors[use] = float((g2 * (yq - y) ** 2).sum()) / ref if ref > 0 else 0.0
        best = min(errors, key=errors.get)
        st.rel_error[qtype], st.with_imatrix[qtype] = errors[best], best


def _fit(qtype: QT, cols: int) -> QT:
    from edgemoe.converters.types import choose_type

    return choose_type(qtype, cols)


def dequantized(m: np.ndarray, qtype: QT, imatrix: np.ndarray | None) -> np.ndarray:
    """m [rows, cols] float32 after a round trip through ggml's quantizer in `qtype`."""
    q = quantize(m, qtype, imatrix)
    return np.asarray(gguf.quants.dequantize(q, qtype), dtype=np.float32).reshape(m.shape)
