"""Measuring tools: speed, quality and endurance, each printed side by side with its baseline.

    speed.py             `edgemoe bench`: edgemoe vs llama.cpp tokens/s at several budgets
    quality.py           perplexity, KL and top-1 agreement vs a reference (`edgemoe eval`)
    mixed.py             `python -m edgemoe.bench.mixed`: mixed precision vs uniform types
    soak.py              `python -m edgemoe.bench.soak`: long generation, RSS/fd/thread growth
    predictors.py        end-to-end tokens/s per prefetch predictor (`edgemoe predictor bench`)
    predictor_compare.py predictors scored on a routing trace (`edgemoe simulate --compare-predictors`)
    predictor_report.py  their tables
"""
