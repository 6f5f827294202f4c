"""Every error the server answers is an OpenAI-shaped error object:
`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status, so OpenAI clients raise
their usual exceptions (BadRequestError, RateLimitError, ...) with our message."""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None, \
            "invalid_json"
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    return where + str(first.get("msg", "invalid value")), param, "invalid_value"


def install(app: FastAPI, on_error=None) -> None:
    """Handlers that turn every failure into an OpenAI error object; `on_error(status)` counts them."""

    def answer(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
        if on_error:
            on_error(status)
        return JSONResponse(error_body(status, message, param, code), status, headers=headers)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return answer(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return answer(400, message, param, code)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        return answer(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        return answer(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, before they are parsed or held whole:
    from Content-Length (the body is read and dropped, so the client gets to read the answer),
    or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_error=None):
        self.app, self.max_bytes, self.on_error = app, max_bytes, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            message = await receive()
            while message["type"] == "http.request" and message.get("more_body"):
                message = await receive()
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI passes an HTTPException from the body read through
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes (--max-body)"

    async def _refuse(self, send: Send) -> None:
        if self.on_error:
            self.on_error(413)
        body = json.dumps(error_body(413, self._message(), code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
