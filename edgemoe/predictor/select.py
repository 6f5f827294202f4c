"""Which predictor an engine's prefetcher gets (EngineConfig.predictor / predictor_path).

A learned predictor that cannot be used (missing, corrupt, or made for another model) never
stops generation: the engine prefetches with router speculation instead and says why."""
from __future__ import annotations

from edgemoe.predictor.base import Predictor, PredictorError, RouterPredictor, RoutingShape, make_predictor


def engine_predictor(engine, name: str, path: str | None = None) -> tuple[Predictor, list[str]]:
    """(predictor, warnings) for `engine`. name: none | router | prior | learned; for learned,
    `path` is the .onnx file (None: embedded in the GGUF or beside the model)."""
    shape = RoutingShape.of_engine(engine)
    if not name.startswith("learned"):
        return make_predictor(name, shape), []
    from edgemoe.predictor.onnx_runtime import locate

    try:
        predictor = make_predictor(name, shape, path if path is not None else locate(engine.path))
    except PredictorError as exc:
        return RouterPredictor(shape), [f"{exc}; prefetching with router speculation instead"]
    if predictor.model_mismatch and any(b.router.shape[0] < shape.n_experts for b in engine.model.moe_blocks):
        # a pruned file numbers each layer's experts by stored index: another file's ids mean other experts
        return RouterPredictor(shape), [f"{predictor.label} was trained on traces of {predictor.meta['model']!r}; "
                                        f"{engine.path.name} has pruned layers whose experts are numbered "
                                        "differently, so it cannot be used (train one on this file's traces); "
                                        "prefetching with router speculation instead"]
    return predictor, [note for note in (predictor.model_mismatch,) if note]
