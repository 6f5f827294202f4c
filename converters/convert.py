"""`edgemoe convert`: HF checkpoint folder -> GGUF in llama.cpp's stock layout.

Streaming: tensor infos are planned from safetensors headers alone, then each tensor (one
expert slice at a time for 3-D expert tensors) is read, quantized and appended. Peak
memory is about one expert matrix (or the largest dense tensor) plus its quantized copy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from edgemoe.converters.arch import PlannedTensor, converter_for
from edgemoe.converters.atomic import atomic_output, check_output_path
from edgemoe.converters.errors import ConvertError
from edgemoe.converters.hf_checkpoint import HFCheckpoint
from edgemoe.converters.types import choose_type, parse_output_type
from edgemoe.converters.vocab import write_vocab
from edgemoe.native.quant import quantize, row_bytes

# (bytes written so far, total bytes, tensor name)
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ConvertReport:
    path: Path
    architecture: str
    n_tensors: int
    total_bytes: int
    expert_bytes: int
    seconds: float
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> type used instead


@dataclass(frozen=True)
class _Job:
    tensor: PlannedTensor
    qtype: QT
    nbytes: int


def convert(hf_dir: str | Path, out_path: str | Path, out_type: str = "f16",
            on_progress: ProgressFn | None = None) -> ConvertReport:
    start = time.perf_counter()
    requested, file_type = parse_output_type(out_type)
    out = Path(out_path)
    check_output_path(out)
    ckpt = HFCheckpoint(hf_dir)
    conv = converter_for(ckpt)

    w = gguf.GGUFWriter(path=None, arch=conv.arch_name)
    w.add_name(Path(hf_dir).resolve().name)
    conv.write_hparams(w)
    w.add_file_type(int(file_type))
    if requested not in (QT.F32, QT.F16, QT.BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, ckpt.folder, int(ckpt.config["vocab_size"]))

    jobs, fallbacks = write_gguf(w, conv.plan(), requested, out, on_progress)
    return ConvertReport(out, ckpt.architecture, len(jobs), sum(j.nbytes for j in jobs),
                         sum(j.nbytes for j in jobs if j.tensor.expert_tensor),
                         time.perf_counter() - start, fallbacks)


def write_gguf(w: gguf.GGUFWriter, plan: list[PlannedTensor], requested: QT, out: Path,
               on_progress: ProgressFn | None = None) -> tuple[list[_Job], dict[str, str]]:
    """Add tensor infos for `plan` to a writer holding the metadata, then stream the data to
    `out` atomically. Returns the jobs written and the type fallbacks taken."""
    jobs, fallbacks = _plan_jobs(plan, requested)
    for job in jobs:
        t = job.tensor
        w.add_tensor_info(t.name, (*t.shape[:-1], row_bytes(job.qtype, t.shape[-1])), np.dtype(np.uint8),
                          job.nbytes, raw_dtype=job.qtype)
    total = sum(j.nbytes for j in jobs)
    with atomic_output(out) as tmp:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        try:
            _write_data(w, jobs, total, on_progress)
        finally:
            w.close()
    return jobs, fallbacks


def _plan_jobs(plan: list[PlannedTensor], requested: QT) -> tuple[list[_Job], dict[str, str]]:
    jobs, fallbacks = [], {}
    for t in plan:
        wanted = t.qtype if t.qtype is not None else requested
        qtype = t.raw_qtype or (QT.F32 if t.keep_f32 else choose_type(wanted, t.shape[-1]))
        if qtype != wanted and not t.keep_f32 and not t.raw_qtype:
            fallbacks[t.name] = qtype.name
        n_rows = int(np.prod(t.shape[:-1], dtype=np.int64))
        jobs.append(_Job(t, qtype, n_rows * row_bytes(qtype, t.shape[-1])))
    return jobs, fallbacks


def _write_data(w: gguf.GGUFWriter, jobs: list[_Job], total: int, on_progress: ProgressFn | None) -> None:
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    done = 0
    for job in jobs:
        t = job.tensor
        per_part = int(np.prod(t.shape, dtype=np.int64)) // len(t.parts)
        written = 0
        for load in t.parts:
            data = load()
            if t.raw_qtype is not None:
                block = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
            else:
                if data.size != per_part or data.shape[-1] != t.shape[-1]:
                    raise ConvertError(f"tensor {t.name}: a part has shape {data.shape}, "
                                       f"expected {per_part} values in rows of {t.shape[-1]}")
                if not np.isfinite(data).all():
                    raise ConvertError(f"tensor {t.name} holds NaN or Inf values; the checkpoint is corrupt")
                block = quantize(data.reshape(-1, t.shape[-1]), job.qtype, t.imatrix)
            fout.write(block.data)
            written += block.nbytes
            done += block.nbytes
            if on_progress:
                on_progress(done, total, t.name)
        if written != job.nbytes:
            raise ConvertError(f"tensor {t.name}: wrote {written} bytes, planned {job.nbytes}")
        w.write_padding(fout, job.nbytes)
