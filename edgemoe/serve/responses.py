"""Response bodies of the OpenAI API (chat.completion, text_completion, their stream chunks).

Beyond the API's fields every response names how the prompt was built: `system_fingerprint`
is "edgemoe-<backend>-<prompt format>" and an `edgemoe` object (final responses and the last
stream chunk) holds the format with a sentence saying what it means ("plain-continuation": the
model has no chat template), the prompt tokens kept from the previous request (KV reuse), time to
first token, decode rate and, with an expert cache, the request's cache counters.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from edgemoe.serve.prompts import PromptFormat
from edgemoe.serve.runner import Finished


@dataclass(frozen=True)
class Reply:
    """What every body of one response shares."""
    id: str
    created: int
    model: str
    backend: str
    fmt: PromptFormat
    chat: bool
    has_cache: bool

    @property
    def fingerprint(self) -> str:
        return f"edgemoe-{self.backend}-{self.fmt.name}"


def new_reply(chat: bool, model: str, backend: str, fmt: PromptFormat, has_cache: bool) -> Reply:
    prefix = "chatcmpl" if chat else "cmpl"
    return Reply(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, backend, fmt, chat, has_cache)


def usage(done: Finished) -> dict:
    t = done.totals
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens,
            "total_tokens": t.prompt_tokens + t.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": t.kv_reused_tokens}}


def extension(reply: Reply, done: Finished) -> dict:
    t = done.totals
    out = {"prompt_format": reply.fmt.name, "note": reply.fmt.note, "backend": reply.backend,
           "kv_reused_tokens": t.kv_reused_tokens, "prefilled_tokens": t.prompt_tokens - t.kv_reused_tokens,
           "time_to_first_token_s": round(done.ttft_s, 6), "decode_tokens_per_s": round(done.decode_tps, 3)}
    if reply.has_cache:
        out["cache"] = t.cache_dict()
    return out


def _head(reply: Reply, obj: str) -> dict:
    return {"id": reply.id, "object": obj, "created": reply.created, "model": reply.model,
            "system_fingerprint": reply.fingerprint}


def full_body(reply: Reply, text: str, done: Finished) -> dict:
    if reply.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": done.reason}
        body = _head(reply, "chat.completion")
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.reason}
        body = _head(reply, "text_completion")
    return body | {"choices": [choice], "usage": usage(done), "edgemoe": extension(reply, done)}


def chunk(reply: Reply, text: str | None = None, finish: str | None = None, role: bool = False,
          include_usage: bool = False) -> dict:
    """One stream chunk: a piece of text, the opening role (chat), or the finish reason."""
    if reply.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = _head(reply, "chat.completion.chunk")
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = _head(reply, "text_completion")
    body["choices"] = [choice]
    if include_usage:
        body["usage"] = None  # the API's convention: usage comes in one extra chunk at the end
    return body


def closing_chunks(reply: Reply, done: Finished, include_usage: bool) -> list[dict]:
    last = chunk(reply, finish=done.reason, include_usage=include_usage) | {"edgemoe": extension(reply, done)}
    if not include_usage:
        return [last]
    return [last, _head(reply, last["object"]) | {"choices": [], "usage": usage(done)}]


def sse(body: dict | str) -> str:
    """A server-sent event as OpenAI clients read it: `data: <json>` and a blank line."""
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"
