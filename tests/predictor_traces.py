"""Synthetic routing traces for the predictor tests: a known routing process, so each predictor's
precision has an exact expectation, written in seconds without a model."""
from __future__ import annotations

import random

from edgemoe.trace import Trace


def synthetic_trace(n_prompts: int = 6, n_decode: int = 40, n_layers: int = 4, n_experts: int = 8, seed: int = 0,
                    logits: bool = True, model: str = "synthetic.gguf") -> Trace:
    """Top-2 routing where layer l+1 uses (e+1) mod E of layer l's experts and a token's first
    layer repeats the previous token's with probability 0.7. Router look-ahead rows score the
    true experts of each layer ahead highest (exact router speculation)."""
    rng = random.Random(seed)
    layers = list(range(n_layers))
    trace = Trace(model, n_experts, 2, layers, {(l, e): 1000 for l in layers for e in range(n_experts)}, [],
                  [] if logits else None)

    def token(prev_first):
        first = prev_first if prev_first and rng.random() < 0.7 else sorted(rng.sample(range(n_experts), 2))
        return [sorted((e + l) % n_experts for e in first) for l in layers], first

    def rows(route, index):
        out = []
        for l in layers[index:index + 4]:
            row = [rng.uniform(-1.0, 0.0) for _ in range(n_experts)]
            for e in route[l]:
                row[e] = 2.0
            out.append(row)
        return out

    for _ in range(n_prompts):
        prefill = [token(None)[0] for _ in range(5)]
        trace.steps.append({l: [t[l] for t in prefill] for l in layers})
        if logits:
            trace.router_logits.append({l: rows(prefill[-1], i) for i, l in enumerate(layers)})
        first = prefill[-1][0]
        for _ in range(n_decode):
            route, first = token(first)
            trace.steps.append({l: [route[l]] for l in layers})
            if logits:
                trace.router_logits.append({l: rows(route, i) for i, l in enumerate(layers)})
    return trace
