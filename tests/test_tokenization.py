"""Tokens of a converted file are exactly the checkpoint tokenizer's: llama.cpp (which the engine
tokenizes through) vs transformers for byte-level BPE, vs the sentencepiece library for
SentencePiece models. (transformers 5 runs SentencePiece models through a converted fast
tokenizer that drops one '▁' before runs of leading spaces; sentencepiece itself, and
llama.cpp, keep it — so the model's own library is the reference there.)"""
from __future__ import annotations

import pytest

from edgemoe.converters.convert import convert
from edgemoe.tokenizer import Tokenizer

STRINGS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n",
    "The os module provides a portable way of using operating system dependent functionality.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nmixed",
    "numbers 1234567890 3.14159 1e-10 0x1F",
    "unicode: naïve café, 日本語のテキスト, Ελληνικά, emoji 🚀🔥",
    "symbols: <>{}[]()!@#$%^&*_+-=|\\/~`'\"",
    "CamelCaseIdentifiers and snake_case_names and SCREAMING_CASE",
    "",
]


@pytest.fixture(scope="module", params=["qwen2moe", "mixtral"], ids=["bpe", "sentencepiece"])
def pair(request, tiny_checkpoint, tmp_path_factory):
    from transformers import AutoTokenizer

    ckpt = tiny_checkpoint(request.param)
    path = convert(ckpt, tmp_path_factory.mktemp("tok") / "m.gguf", "q8_0").path
    if (ckpt / "tokenizer.model").exists():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
        return sp.encode, sp.decode, Tokenizer(path)
    hf = AutoTokenizer.from_pretrained(ckpt)
    return (lambda t: hf(t, add_special_tokens=False)["input_ids"]), hf.decode, Tokenizer(path)


@pytest.mark.parametrize("text", STRINGS)
def test_llama_cpp_tokens_equal_reference(pair, text):
    encode, _, ours = pair
    assert ours.encode(text, add_bos=False) == encode(text)


def test_decode_round_trips(pair):
    _, decode, ours = pair
    for text in STRINGS:
        ids = ours.encode(text, add_bos=False)
        # SentencePiece's dummy prefix: llama.cpp keeps the leading space of a decode from scratch
        assert decode(ids) == text
        assert ours.decode(ids) in (text, " " + text)
