"""The conversation and how it becomes prompt tokens: the model's chat template where the GGUF
has one, plain continuation of one running document otherwise.

Every turn re-encodes the whole conversation: exactly what the model would see if the
conversation were typed in one go. The backends keep the KV cache of the tokens they last saw
and prefill only from where the new prompt departs from them (usually: only the new turn).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgemoe.errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 128
    seed: int | None = None  # None: the backend's own (the engine config's seed)


def read_sampling(temperature: str, top_p: str, max_tokens: str, n_ctx: int) -> Sampling:
    """Raises ValueError with a message the dialog shows as is."""
    try:
        t = float(temperature)
    except ValueError:
        raise InputError(f"temperature {temperature!r} is not a number (0 = greedy)") from None
    try:
        p = float(top_p)
    except ValueError:
        raise InputError(f"top-p {top_p!r} is not a number in (0, 1]") from None
    try:
        n = int(max_tokens)
    except ValueError:
        raise InputError(f"max tokens {max_tokens!r} is not a whole number") from None
    if t < 0:
        raise InputError("temperature must be 0 (greedy) or more")
    if not 0 < p <= 1:
        raise InputError("top-p must be in (0, 1]")
    if not 1 <= n <= n_ctx - 2:
        raise InputError(f"max tokens must be between 1 and {n_ctx - 2} (the context is {n_ctx} tokens)")
    return Sampling(t, p, n)


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Vocab:
    """What prompt building needs from a tokenizer (both backends read it from llama.cpp)."""
    encode: Callable[[str, bool, bool], list[int]]  # (text, add_bos, special) -> ids
    bos_text: str = ""
    eos_text: str = ""
    chat_template: str | None = None


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        self.turns.append(Turn(role, content))

    def clear(self) -> None:
        self.turns.clear()


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_turns: int = 0   # oldest turns left out to fit the context
    truncated: bool = False  # the newest turns alone did not fit: their oldest tokens were cut


def plain_text(turns: list[Turn]) -> str:
    """One running document: each user turn starts on a new line after what came before."""
    text = ""
    for turn in turns:
        if turn.role == "user" and text and not text.endswith("\n"):
            text += "\n"
        text += turn.content
    return text


def template_text(turns: list[Turn], vocab: Vocab) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(vocab.chat_template, vocab.eos_text, vocab.bos_text)
    return formatter(messages=[{"role": t.role, "content": t.content} for t in turns]).prompt


def encode_turns(turns: list[Turn], vocab: Vocab) -> list[int]:
    if vocab.chat_template:
        text = template_text(turns, vocab)
        # templates usually write the BOS text themselves; special=True keeps their markers whole
        add_bos = not (vocab.bos_text and text.startswith(vocab.bos_text))
        return vocab.encode(text, add_bos, True)
    return vocab.encode(plain_text(turns), True, False)


def build_prompt(conversation: Conversation, vocab: Vocab, limit_tokens: int) -> Prompt:
    """Prompt ids of at most `limit_tokens` (context minus the tokens to generate): the oldest
    turns are dropped first, then the oldest tokens of what is left (keeping the first token,
    usually BOS)."""
    if limit_tokens < 2:
        raise InputError(f"no room for a prompt: the context leaves {limit_tokens} tokens after "
                         "max tokens; lower max tokens in settings (F3) or raise --ctx")
    turns = list(conversation.turns)
    dropped = 0
    ids = encode_turns(turns, vocab)
    while len(ids) > limit_tokens and len(turns) > 1:
        turns.pop(0)
        dropped += 1
        while len(turns) > 1 and turns[0].role != "user":  # templates expect a user turn first
            turns.pop(0)
            dropped += 1
        ids = encode_turns(turns, vocab)
    if len(ids) <= limit_tokens:
        return Prompt(ids, dropped)
    return Prompt(ids[:1] + ids[len(ids) - limit_tokens + 1:], dropped, truncated=True)
