"""Requests -> prompt token ids, through the same prompt building as the terminal chat
(`edgemoe.tui.prompt`): the GGUF's chat template where it has one (jinja2, sandboxed, via
llama-cpp-python's formatter), plain continuation of one running document otherwise."""
from __future__ import annotations

from dataclasses import dataclass

from edgemoe.serve.errors import APIError
from edgemoe.serve.schemas import ChatCompletionRequest, CompletionRequest
from edgemoe.tui.prompt import Turn, encode_turns

COMPLETION_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions


@dataclass(frozen=True)
class PromptFormat:
    name: str   # "chat-template" | "plain-continuation"
    note: str


def prompt_format(has_template: bool) -> PromptFormat:
    if has_template:
        return PromptFormat("chat-template", "messages were rendered with the model's own chat template")
    return PromptFormat("plain-continuation",
                        "the model has no chat template: the messages were joined into one running document "
                        "(each user message on a new line) and the model continues it")


def chat_ids(req: ChatCompletionRequest, vocab) -> list[int]:
    # templates know system/user/assistant; "developer" is the OpenAI API's newer name for system
    turns = [Turn("system" if m.role == "developer" else m.role, m.text) for m in req.messages]
    try:
        return encode_turns(turns, vocab)
    except Exception as exc:  # a template's raise_exception (e.g. roles out of order) or a jinja2 error
        raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages") from exc


def completion_ids(req: CompletionRequest, vocab, n_vocab: int) -> list[int]:
    prompt = req.one_prompt
    if isinstance(prompt, str):
        return vocab.encode(prompt, True, False)
    bad = [t for t in prompt if not 0 <= t < n_vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})", param="prompt")
    return list(prompt)


def token_budget(n_prompt: int, requested: int | None, n_ctx: int, default: int | None) -> int:
    """max_tokens for a prompt of `n_prompt` tokens: the request's, else `default` (None: the rest
    of the context), refused when prompt + max_tokens do not fit the context."""
    room = n_ctx - n_prompt
    if requested is None:
        requested = room if default is None else min(default, room)
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    if requested < 1 or n_prompt + requested > n_ctx:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                            f"{n_prompt + max(requested, 1)} tokens ({n_prompt} in the prompt, {max(requested, 1)} "
                            "for the completion). Shorten the prompt or lower max_tokens (or restart the server "
                            "with a larger --ctx).", param="messages", code="context_length_exceeded")
    return requested
