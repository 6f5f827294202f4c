"""How the budgeted llama mode has llama.cpp load a stock GGUF file: the API it needs, the load
parameters of its two layouts, and llama.cpp's mapping of the tensor data once it has loaded.

Two layouts (edgemoe/llama_budget.py picks one):
- slots: mmap, no CPU repack, no lazy row reads. Experts stay file pages of llama.cpp's own
  mapping, so reused slots can be moved over them (edgemoe/llama_slots.py).
- default: llama.cpp's own defaults (CPU repack on), as plain `--backend llama` loads the file:
  for a budget that holds every expert (edgemoe/llama_full.py).
"""
from __future__ import annotations

import ctypes

from edgemoe.errors import EdgemoeError
from edgemoe.gguf_file import ModelFileError
from edgemoe.llama_pages import Mapping, file_mappings, mapping_rss_bytes

LLAMA_LAZY_MODE_OFF = 0  # llama.cpp's own on-demand row reads would bypass our mapping


class LlamaApiMissing(EdgemoeError, RuntimeError):
    """The installed llama-cpp-python lacks what the budgeted mode needs."""


def _low_level():
    from llama_cpp import llama_cpp as low

    return low


def check_api(gpu_layers: int = 0) -> None:
    """One clear line if this llama-cpp-python cannot run the budgeted mode."""
    import llama_cpp

    low = _low_level()
    version = getattr(llama_cpp, "__version__", "?")
    model = {name for name, _ in low.llama_model_params._fields_}
    context = {name for name, _ in low.llama_context_params._fields_}
    missing = [f"llama_model_params.{f}" for f in ("use_extra_bufts", "load_mode", "lazy_mode") if f not in model]
    missing += [f"llama_context_params.{f}" for f in ("cb_eval", "cb_eval_user_data") if f not in context]
    if gpu_layers:
        missing += [f"llama_model_params.{f}" for f in ("tensor_buft_overrides", "n_gpu_layers") if f not in model]
    if missing:
        raise LlamaApiMissing(f"llama-cpp-python {version} lacks {', '.join(missing)}, which the budgeted llama mode "
                              "needs (0.3.36 has them); run without --budget, or use --backend edgemoe")
    if gpu_layers and not low.llama_supports_gpu_offload():
        raise LlamaApiMissing(f"this llama-cpp-python {version} build has no GPU backend, so --gpu-layers "
                              f"{gpu_layers} cannot offload anything; rebuild it with CUDA or Vulkan, or drop --gpu-layers")


class _OverrideEntry(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]  # llama_model_tensor_buft_override


EXPERT_TENSORS = rb"blk\.\d+\.ffn_(gate|up|down|gate_up)_exps"  # what llama.cpp's --cpu-moe keeps in RAM


def load_params(gpu_layers: int, expert_overrides: bool, default_layout: bool = False) -> tuple[dict, dict, object]:
    """(model params, context params, what must stay alive while loading). Slots layout (CPU):
    mmap, no repack, no lazy reads. Default layout: llama.cpp's defaults (nothing set). GPU, both
    layouts: dense layers on the device (n_gpu_layers), and with `expert_overrides` the expert
    tensors in CPU memory (tensor buffer overrides, llama.cpp's --cpu-moe pattern). The slots
    layout also turns op offload off (it would copy every expert to the device for big batches);
    the default layout keeps llama.cpp's default for it, as llama.cpp's own --cpu-moe runs.
    UNTESTED on a GPU: no GPU was available where this was written."""
    model = {} if default_layout else dict(use_extra_bufts=False, lazy_mode=LLAMA_LAZY_MODE_OFF)
    if gpu_layers:
        model["n_gpu_layers"] = gpu_layers
    context = dict(op_offload=False) if gpu_layers and not default_layout else {}
    if not expert_overrides:
        return model, context, None
    from edgemoe.native.lib import ggml_base

    lib = ggml_base()
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    overrides = (_OverrideEntry * 2)(_OverrideEntry(EXPERT_TENSORS, lib.ggml_backend_cpu_buffer_type()),
                                     _OverrideEntry(None, None))
    model["tensor_buft_overrides"] = ctypes.addressof(overrides)
    return model, context, overrides


def find_llama_mapping(path, before: list[Mapping], runs: list[tuple[int, int]]) -> Mapping:
    """llama.cpp's mapping of the tensor data: a mapping made during load that covers every
    expert page at its file offset (VMAs of one mapping are merged); of several, the one
    llama.cpp populated (most resident pages)."""
    lo, hi = runs[0][0], runs[-1][0] + runs[-1][1]
    new = sorted(m for m in file_mappings(path) if m not in before)
    merged: list[Mapping] = []
    for m in new:
        last = merged[-1] if merged else None
        if last and m.start == last.end and m.offset == last.offset + last.size:
            merged[-1] = Mapping(last.start, m.end, last.perms, last.offset)
        else:
            merged.append(m)
    covering = [m for m in merged if m.covers(lo, hi - lo)]
    if not covering:
        raise ModelFileError(f"llama.cpp did not map {path} where its experts lie (bytes {lo}..{hi}); the "
                             "budgeted mode needs llama.cpp to load with mmap")
    return max(covering, key=lambda m: mapping_rss_bytes(m.start, m.end)[0])
