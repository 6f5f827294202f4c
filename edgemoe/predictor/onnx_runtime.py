"""The learned predictor at run time: the exported MLP run by onnxruntime.

`InferenceSession.run` releases the GIL, so in the prefetch thread it overlaps the engine's
compute. The file's metadata_props say which model it was trained for; a file for another layer
or expert count is refused with a `PredictorError` (the engine then prefetches without it).

Where the file lives: an explicit path, or beside the model (`demo.gguf` -> `demo.predictor.onnx`),
or embedded in the model's GGUF under the key `edgemoe.predictor.onnx` (uint8 array), as
`edgemoe predictor train --embed MODEL.gguf` writes it (predictor/embed.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgemoe.predictor.base import Prediction, Predictor, PredictorError, Query, RoutingShape
from edgemoe.predictor.features import FeatureSpec

FORMAT = "edgemoe-predictor/1"
GGUF_KEY = "edgemoe.predictor.onnx"


class LearnedPredictor(Predictor):
    name = "learned"

    def __init__(self, source: str | os.PathLike | bytes, shape: RoutingShape, horizon: int | None = None):
        self.label = "embedded predictor" if isinstance(source, bytes) else str(source)
        self.session = open_session(source, self.label)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.meta = check_metadata(meta, shape, self.label)
        self.shape = shape
        self.spec = FeatureSpec(shape.n_layers, shape.n_experts, meta.get("use_logits", "1") == "1")
        self.needs_logits = self.spec.use_logits
        self.trained_horizon = int(meta["horizon"])
        self.horizon = min(horizon or self.trained_horizon, self.trained_horizon)
        inp = self.session.get_inputs()[0]
        if inp.shape[-1] != self.spec.size:
            raise PredictorError(f"{self.label}: input width {inp.shape[-1]} != {self.spec.size} features for "
                                 f"{shape.n_layers} MoE layers x {shape.n_experts} experts; retrain it with "
                                 "`edgemoe predictor train`")
        self.input_name = inp.name
        self._x = np.zeros((1, self.spec.size), np.float32)

    @property
    def model_mismatch(self) -> str | None:
        """A note when the file was trained on another model file with the same routing shape."""
        if self.meta["model"] != self.shape.model:
            return (f"{self.label} was trained on traces of {self.meta['model']!r}, not {self.shape.model!r} "
                    "(same layer and expert counts; using it)")
        return None

    def probabilities(self, q: Query) -> np.ndarray:
        """[H, E] probability that each expert is chosen 1..H MoE layers ahead."""
        self._x[:] = 0.0
        self.spec.encode(q, self._x[0])
        return self.session.run(None, {self.input_name: self._x})[0][0]

    def predict(self, q: Query) -> Prediction:
        top = np.argsort(-self.probabilities(q)[: self.horizon], axis=1, kind="stable")[:, : self.shape.top_k]
        return [(a + 1, e) for a, row in enumerate(top.tolist()) for e in row]


def open_session(source: str | os.PathLike | bytes, label: str):
    import onnxruntime as ort

    if not isinstance(source, bytes) and not Path(source).is_file():
        raise PredictorError(f"predictor file {source} does not exist; train one with "
                             "`edgemoe predictor train TRACE... -o FILE.onnx`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # a tiny MLP: one thread, leave the cores to the engine
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(source if isinstance(source, bytes) else os.fspath(source), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise PredictorError(f"{label} is not a readable ONNX predictor ({type(exc).__name__}: "
                             f"{str(exc).strip()[:200]}); retrain it with `edgemoe predictor train`") from None


def check_metadata(meta: dict[str, str], shape: RoutingShape, label: str) -> dict[str, str]:
    if meta.get("edgemoe.format") != FORMAT:
        raise PredictorError(f"{label} is an ONNX file but not an edgemoe routing predictor "
                             f"(metadata edgemoe.format={meta.get('edgemoe.format')!r}, want {FORMAT!r})")
    try:
        got = (json.loads(meta["moe_layers"]), int(meta["n_experts"]), int(meta["top_k"]), int(meta["horizon"]))
    except (KeyError, ValueError) as exc:
        raise PredictorError(f"{label}: malformed predictor metadata ({exc}); retrain it") from None
    want = (list(shape.moe_layers), shape.n_experts, shape.top_k)
    if got[:3] != want:
        raise PredictorError(
            f"{label} was trained for {len(got[0])} MoE layers x {got[1]} experts (top-{got[2]}) of "
            f"{meta.get('model')!r}, but {shape.model} has {shape.n_layers} MoE layers x {shape.n_experts} experts "
            f"(top-{shape.top_k}); train one on this model's traces with `edgemoe predictor train`")
    return meta


def locate(model_path: str | os.PathLike) -> str | bytes:
    """The predictor that belongs to a model: embedded in its GGUF, else the file beside it."""
    from edgemoe.gguf_file import GGUFFile

    model_path = Path(model_path)
    embedded = GGUFFile(model_path).field(GGUF_KEY)
    if embedded is not None:
        return bytes(np.asarray(embedded, np.uint8))
    beside = beside_path(model_path)
    if not beside.is_file():
        raise PredictorError(f"no predictor for {model_path}: neither embedded ({GGUF_KEY}) nor at {beside}; "
                             "train one with `edgemoe predictor train TRACE... -o " + str(beside) + "`")
    return str(beside)


def beside_path(model_path: str | os.PathLike) -> Path:
    return Path(model_path).with_suffix(".predictor.onnx")
