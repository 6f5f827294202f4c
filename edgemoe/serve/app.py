"""The FastAPI app: OpenAI-compatible endpoints over one backend (the terminal chat's
`EngineChat` / `LlamaChat`, `edgemoe.tui.backends.open_backend`), one generation at a time.

    POST /v1/chat/completions   POST /v1/completions   (streamed as server-sent events or not)
    GET  /v1/models             GET  /health           GET /metrics (Prometheus text)

`create_app(backend, ServeOptions(...))` builds it; the CLI and the tests both use it. The app
never closes the backend (its opener does), but stops its generation worker on shutdown.
"""
from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgemoe.gguf_file import GGUFFile
from edgemoe.serve import errors
from edgemoe.serve.errors import APIError, error_body
from edgemoe.serve.metrics import Metrics
from edgemoe.serve.prompts import COMPLETION_MAX_TOKENS, chat_ids, completion_ids, prompt_format, token_budget
from edgemoe.serve.responses import Reply, chunk, closing_chunks, full_body, new_reply, sse
from edgemoe.serve.runner import Failed, Finished, Job, Piece, Runner
from edgemoe.serve.schemas import ChatCompletionRequest, CompletionRequest
from edgemoe.tui.prompt import Sampling

DISCONNECT_POLL_S = 0.1  # a non-streamed request checks this often whether its client is still there


@dataclass(frozen=True)
class ServeOptions:
    model_id: str | None = None   # the name /v1/models lists (default: the model's name or file stem)
    api_key: str | None = None    # required as "Authorization: Bearer KEY" on /v1/* and /metrics when set
    max_waiting: int = 8          # requests that may wait while one generates; more get 429
    max_body_bytes: int = 1 << 20


def create_app(backend, options: ServeOptions = ServeOptions()) -> FastAPI:
    info = backend.info
    model_id = options.model_id or info.title
    metrics = Metrics(model_id, backend.name, backend.controls_cache)
    runner = Runner(backend, metrics, options.max_waiting)
    fmt = prompt_format(info.chat_template)
    n_vocab = GGUFFile(info.summary.path).array_length("tokenizer.ggml.tokens") or 0

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        runner.start()
        try:
            yield
        finally:
            await run_in_threadpool(runner.close)  # waits for a token in flight without blocking the loop

    app = FastAPI(title="edgemoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runner, app.state.metrics = runner, metrics
    errors.install(app, metrics.error)
    app.add_middleware(errors.BodyLimit, max_bytes=options.max_body_bytes, on_error=metrics.error)
    auth = [Depends(_auth(options.api_key))]

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "edgemoe",
                "backend": backend.name, "context_length": info.n_ctx, "prompt_format": fmt.name}

    @app.get("/health")
    async def health():
        state = runner.state(residency=False)
        return {"status": "ok", "model": model_id, "backend": backend.name, "generating": state.generating,
                "waiting": state.waiting}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"model {name!r} is not loaded; this server serves {model_id!r}", param="model",
                           code="model_not_found")
        return model_card()

    @app.get("/metrics", dependencies=auth)
    async def prometheus():
        state = await run_in_threadpool(runner.state)
        return PlainTextResponse(metrics.render(state), media_type="text/plain; version=0.0.4")

    async def generate(request: Request, req, ids: list[int], endpoint: str, default_max: int | None):
        max_tokens = token_budget(len(ids), req.token_limit, info.n_ctx, default_max)
        job = Job(ids, Sampling(req.temperature, req.top_p, max_tokens, req.seed), req.stops, endpoint,
                  asyncio.get_running_loop())
        runner.submit(job)  # 429 when the queue is full
        reply = new_reply(endpoint == "chat", model_id, backend.name, fmt, backend.controls_cache)
        headers = {"x-edgemoe-prompt-format": fmt.name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(runner, job, reply, include_usage), media_type="text/event-stream",
                                     headers=headers | {"cache-control": "no-cache"})
        return await _collect(runner, job, reply, request, headers)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _refuse_unsupported(req)
        ids = await run_in_threadpool(chat_ids, req, backend.vocab)
        return await generate(request, req, ids, "chat", None)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        _refuse_unsupported(req)
        ids = await run_in_threadpool(completion_ids, req, backend.vocab, n_vocab)
        return await generate(request, req, ids, "completions", COMPLETION_MAX_TOKENS)

    return app


def _refuse_unsupported(req) -> None:
    found = req.unsupported()
    if found:
        raise APIError(400, found[1], param=found[0], code="unsupported_parameter")


def _auth(api_key: str | None):
    async def check(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the server's --api-key as "
                                "'Authorization: Bearer KEY'", code="invalid_api_key")
    return check


async def _stream(runner: Runner, job: Job, reply: Reply, include_usage: bool):
    try:
        if reply.chat:
            yield sse(chunk(reply, role=True, include_usage=include_usage))
        while True:
            item = await job.items.get()
            if isinstance(item, Piece):
                yield sse(chunk(reply, item.text, include_usage=include_usage))
            elif isinstance(item, Failed):  # the status line is sent: the error travels as an event
                yield sse(error_body(item.status, item.message))
                break
            else:
                for body in closing_chunks(reply, item, include_usage):
                    yield sse(body)
                break
        yield sse("[DONE]")
    finally:  # the client went away (or the stream ended): stop the generation at its next token
        runner.cancel(job)


async def _collect(runner: Runner, job: Job, reply: Reply, request: Request, headers: dict) -> JSONResponse:
    parts: list[str] = []
    checked = float("-inf")  # the first check at once: it also lets the server read the socket's end
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.items.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            now = asyncio.get_running_loop().time()
            if now - checked >= DISCONNECT_POLL_S:  # also while pieces keep coming
                checked = now
                if await request.is_disconnected():
                    runner.cancel(job)
                    return JSONResponse(error_body(499, "client closed the request"), 499)
            if isinstance(item, Piece):
                parts.append(item.text)
            elif isinstance(item, Failed):
                raise APIError(item.status, item.message)
            elif isinstance(item, Finished):
                return JSONResponse(full_body(reply, "".join(parts), item), headers=headers)
    finally:
        runner.cancel(job)
