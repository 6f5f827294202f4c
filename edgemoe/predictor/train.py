"""`edgemoe predictor train`: fit the routing MLP on recorded traces and export it to ONNX.

Samples are the traces' prefetch points (`replay.queries`); targets the experts chosen 1..horizon
MoE layers later (into the next token past the last layer), masked where the trace does not say.
The last `val_share` of each trace's steps is kept for validation (early stopping); evaluate on
traces of text the predictor never saw (the held-out split).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgemoe.predictor.base import PredictorError, RoutingShape
from edgemoe.predictor.features import FeatureSpec
from edgemoe.predictor.model import Probabilities, RoutingMLP
from edgemoe.predictor.onnx_runtime import FORMAT
from edgemoe.predictor.replay import experts_at, queries, target
from edgemoe.trace import Trace

HORIZON = 3


@dataclass(frozen=True)
class TrainReport:
    path: Path
    samples: int
    val_samples: int
    epochs: int
    val_loss: float
    val_precision_at_k: list[float]   # per horizon: top-k predictions that were chosen
    use_logits: bool
    seconds: float


def samples(trace: Trace, spec: FeatureSpec, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X [N, F] features, Y [N, H, E] multi-hot targets, M [N, H] target known."""
    points = list(queries(trace))
    X = np.zeros((len(points), spec.size), np.float32)
    Y = np.zeros((len(points), horizon, spec.n_experts), np.float32)
    M = np.zeros((len(points), horizon), bool)
    for n, pt in enumerate(points):
        spec.encode(pt.query, X[n])
        for a in range(1, horizon + 1):
            t = target(trace, pt.step, pt.index, a)
            if t is not None:
                Y[n, a - 1, list(experts_at(trace, *t))] = 1.0
                M[n, a - 1] = True
    return X, Y, M


def check_compatible(traces: list[Trace]) -> RoutingShape:
    shape = RoutingShape.of_trace(traces[0])
    for t in traces[1:]:
        other = RoutingShape.of_trace(t)
        if (other.moe_layers, other.n_experts, other.top_k) != (shape.moe_layers, shape.n_experts, shape.top_k):
            raise PredictorError(f"traces disagree on the model: {shape} vs {other}; train on one model's traces")
    return shape


def train(trace_paths: list[str | os.PathLike], output: str | os.PathLike, horizon: int = HORIZON,
          hidden: int = 128, epochs: int = 40, seed: int = 0, val_share: float = 0.1,
          on_epoch=None) -> TrainReport:
    t0 = time.perf_counter()
    if horizon < 1:
        raise PredictorError(f"--horizon must be at least 1 (MoE layers ahead), not {horizon}")
    traces = [Trace.load(p) for p in trace_paths]
    shape = check_compatible(traces)
    use_logits = all(t.router_logits is not None for t in traces)
    spec = FeatureSpec(shape.n_layers, shape.n_experts, use_logits)
    train_parts, val_parts = [], []
    for t in traces:
        X, Y, M = samples(t, spec, horizon)
        cut = int(len(X) * (1 - val_share))
        train_parts.append((X[:cut], Y[:cut], M[:cut]))
        val_parts.append((X[cut:], Y[cut:], M[cut:]))
    tr = [torch.from_numpy(np.concatenate(p)) for p in zip(*train_parts)]
    va = [torch.from_numpy(np.concatenate(p)) for p in zip(*val_parts)]
    if len(tr[0]) < 64 or len(va[0]) < 8:
        raise PredictorError(f"too little routing to train on ({len(tr[0])} samples); record longer traces "
                             "with `edgemoe trace --prompts FILE -n 64`")
    torch.manual_seed(seed)
    mlp = RoutingMLP(spec.size, shape.n_experts, horizon, hidden)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only spin on a shared laptop
    try:
        best_state, best_loss, best_epoch = fit(mlp, tr, va, epochs, on_epoch)
    finally:
        torch.set_num_threads(threads)
    mlp.load_state_dict(best_state)
    precision = precision_at_k(mlp, va, shape.top_k)
    export(mlp, spec, shape, horizon, Path(output),
           extra={"val_precision_at_k": json.dumps([round(p, 4) for p in precision]), "train_samples": str(len(tr[0])),
                  "trained_on": json.dumps([Path(p).name for p in trace_paths])})
    return TrainReport(Path(output), len(tr[0]), len(va[0]), best_epoch, best_loss, precision, use_logits,
                       time.perf_counter() - t0)


def fit(mlp: RoutingMLP, tr, va, epochs: int, on_epoch=None, batch: int = 256, patience: int = 6):
    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=1e-4)
    best = (None, float("inf"), 0)
    for epoch in range(1, epochs + 1):
        mlp.train()
        for idx in torch.randperm(len(tr[0])).split(batch):
            loss = masked_bce(mlp(tr[0][idx]), tr[1][idx], tr[2][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        mlp.eval()
        with torch.no_grad():
            val = float(masked_bce(mlp(va[0]), va[1], va[2]))
        if on_epoch:
            on_epoch(epoch, val)
        if val < best[1]:
            best = ({k: v.clone() for k, v in mlp.state_dict().items()}, val, epoch)
        elif epoch - best[2] >= patience:
            break
    return best


def masked_bce(logits: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # logits, y: [N, H, E]  m: [N, H]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)
    return (loss * m).sum() / m.sum().clamp(min=1)


def precision_at_k(mlp: RoutingMLP, data, k: int) -> list[float]:
    with torch.no_grad():
        top = mlp(data[0]).topk(k, dim=-1).indices  # [N, H, k]
    hit = data[1].gather(-1, top).sum(-1)  # [N, H]
    m = data[2]
    return [float((hit[:, h] * m[:, h]).sum() / (k * m[:, h].sum()).clamp(min=1)) for h in range(hit.shape[1])]


def export(mlp: RoutingMLP, spec: FeatureSpec, shape: RoutingShape, horizon: int, path: Path,
           extra: dict[str, str] | None = None) -> None:
    """ONNX file with the routing shape in metadata_props, checked when it is loaded."""
    import onnx

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    model = Probabilities(mlp).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, spec.size),), str(tmp), input_names=["features"],
                          output_names=["probs"], dynamic_axes={"features": {0: "n"}, "probs": {0: "n"}},
                          dynamo=False)
    proto = onnx.load(str(tmp))
    meta = {"edgemoe.format": FORMAT, "model": shape.model, "n_layers": str(shape.n_layers),
            "moe_layers": json.dumps(list(shape.moe_layers)), "n_experts": str(shape.n_experts),
            "top_k": str(shape.top_k), "horizon": str(horizon), "use_logits": str(int(spec.use_logits)),
            "feature_size": str(spec.size), **(extra or {})}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp))
    tmp.replace(path)
