"""`edgemoe predictor train --embed MODEL.gguf`: put the trained predictor inside its model's
GGUF, under `edgemoe.predictor.onnx` (the ONNX bytes as a uint8 array), where `--predictor
learned` finds it first (onnx_runtime.locate).

The GGUF is rewritten to a temporary file beside it and renamed over it (gguf_rewrite): an
interrupted embed leaves the model as it was. Any file can carry one, stock files included: the
key is only metadata, llama.cpp ignores keys it does not know, so a stock file stays loadable by
stock llama.cpp (and by `--backend llama`); only the extended layout's keys make a file edgemoe-only.
A predictor made for another routing shape is refused before the model is touched.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType as VT

from edgemoe.gguf_file import GGUFFile
from edgemoe.gguf_rewrite import KV, rewrite, same_tensors
from edgemoe.predictor.base import RoutingShape
from edgemoe.predictor.onnx_runtime import GGUF_KEY, check_metadata, open_session


def routing_shape(model: GGUFFile) -> RoutingShape:
    """What the engine's traces of `model` record (RoutingShape.of_engine), read from the file."""
    from edgemoe.expert_store import find_experts

    layers = sorted({layer for layer, _ in find_experts(model)})
    return RoutingShape(model.path.name, tuple(layers), int(model.arch_field("expert_count", 0)),
                        int(model.arch_field("expert_used_count", 0)))


def embed(model_path: str | Path, onnx_path: str | Path) -> int:
    """Embed predictor file `onnx_path` in `model_path` (replacing one embedded before); returns its bytes."""
    model_path, onnx_path = Path(model_path), Path(onnx_path)
    data = onnx_path.read_bytes()
    model = GGUFFile(model_path)
    session = open_session(data, str(onnx_path))
    check_metadata(session.get_modelmeta().custom_metadata_map, routing_shape(model), str(onnx_path))
    rewrite(model, model_path, same_tensors(model), set_kv={GGUF_KEY: KV(data, VT.ARRAY, VT.UINT8)})
    return len(data)


def check_target(model_path: str | Path, trace_paths: list) -> None:
    """Before training: the model file can be rewritten and routes like the traces' model."""
    from edgemoe.converters.atomic import check_output_path
    from edgemoe.predictor.base import PredictorError
    from edgemoe.predictor.train import check_compatible
    from edgemoe.trace import Trace

    model = GGUFFile(model_path)
    check_output_path(Path(model_path))
    want, got = check_compatible([Trace.load(p) for p in trace_paths]), routing_shape(model)
    if (want.moe_layers, want.n_experts, want.top_k) != (got.moe_layers, got.n_experts, got.top_k):
        raise PredictorError(f"--embed {model_path}: it has MoE layers {list(got.moe_layers)} x {got.n_experts} experts "
                             f"(top-{got.top_k}), the traces' model {want.model!r} {list(want.moe_layers)} x "
                             f"{want.n_experts} (top-{want.top_k}); embed a predictor in the model it was traced on")
