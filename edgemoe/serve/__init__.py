"""`edgemoe serve`: an OpenAI-compatible HTTP server, a thin layer over the backends'
`StepEvent` stream (docs/SERVE.md).

    app.py        the FastAPI app factory and its endpoints
    schemas.py    request bodies (strict types, unsupported fields refused by name)
    prompts.py    messages / prompts -> token ids (the chat's template or plain continuation)
    runner.py     one generation at a time in a worker thread, a bounded queue, cancellation
    responses.py  OpenAI response and stream-chunk bodies
    metrics.py    counters folded from the events, Prometheus text
    errors.py     OpenAI-shaped error objects for every failure, the request body limit
"""
from edgemoe.serve.app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
