"""Request bodies of the OpenAI API, as far as this server honours them.

Types are strict (a temperature of "0.5" is a wrong type, as in the OpenAI API, not a number to
coerce); unknown fields are ignored (clients send `user`, `metadata`, ... that change nothing
here); known fields this server cannot honour are refused by `unsupported` with a message
naming them, never silently dropped.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 4  # as the OpenAI API


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Sampling(_Body):
    model: str | None = None  # one model is loaded: it answers whatever name a client configured
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field whose value this server cannot honour, else None."""
        if self.n != 1:
            return "n", "this server generates one choice per request (n must be 1)"
        if len(self.stops) > MAX_STOPS:
            return "stop", f"at most {MAX_STOPS} stop sequences"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported (leave it 0): sampling is temperature and top_p only"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens; wins over it
    logprobs: bool | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    response_format: dict | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.tools or (self.tool_choice not in (None, "none")):
            return "tools", "tools and function calling are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        return super().unsupported()


TokenIds = list[int]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def one_prompt(self) -> str | list[int] | None:
        """The prompt as text or token ids; None when it holds several prompts (a batch)."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return p
        return p[0] if len(p) == 1 else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.one_prompt is None:
            return "prompt", "send one prompt per request (a string or one list of token ids)"
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                return name, f"{name} is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1"
        return super().unsupported()
