"""Routing predictors for the prefetcher (ExpertFlow's idea: forecast the experts the next layers
will route to, early enough to load them).

    base.py          Query, RoutingState, the none / prior / router predictors, make_predictor
    lookahead.py     the routers of the next layers applied to this layer's MoE input
    features.py      the learned predictor's input vector
    model.py         the MLP; train.py fits it on traces and exports ONNX (metadata: routing shape)
    onnx_runtime.py  LearnedPredictor: the ONNX file run by onnxruntime; where the file lives
    select.py        the engine's choice, with the fallback when a file is unusable
    replay.py        a trace as the prefetcher sees it; prompts.py corpus prompts
Scoring predictors on a trace and end-to-end tokens/s per predictor are measuring tools:
edgemoe/bench/predictor_compare.py, predictors.py, predictor_report.py.
"""
from edgemoe.predictor.base import PREDICTORS, PredictorError, RoutingShape, make_predictor  # noqa: F401
