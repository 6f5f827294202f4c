"""Tokenization from the GGUF's own vocabulary through llama.cpp's vocab-only load, so our
tokens are exactly llama.cpp's."""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path: Path):
        from llama_cpp import Llama
        from llama_cpp._utils import suppress_stdout_stderr

        from edgemoe.gguf_file import ModelFileError

        try:
            with suppress_stdout_stderr(disable=False):  # llama.cpp logs context warnings to stderr
                self.llm = Llama(str(path), vocab_only=True, verbose=False)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise ModelFileError(f"llama.cpp could not load the vocabulary of {path} (its metadata is corrupt or "
                                 "inconsistent); re-create the file with `edgemoe convert`") from exc
        self.eos = self.llm.token_eos()
        self.bos = self.llm.token_bos()

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def decode_bytes(self, tokens: list[int], prev: list[int] | None = None) -> bytes:
        return self.llm.detokenize(tokens, prev_tokens=prev)

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")
