"""Trained tokenizers: lossless, GPT-2-exact pre-tokenization for BPE, Llama-shaped SentencePiece."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from edgemoe.models.corpus import load_corpus
from edgemoe.models.tiny import tiny_tokenizer
from edgemoe.models.tokenizer import train_bpe

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "class Foo(Bar):\n\tpass\r\n\r\n",
    "The quick brown fox -- isn't it? -- jumps over 12345 lazy dogs.",
    "Unicode: héllo wörld, naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂🚀, ∑ x² ≤ ∞",
    "mixed   spaces\t\ttabs\n\n\nnewlines   ",
    "'s 've 're ll'd don't I'M",
    "x=[1,2,3];print(x[::-1])#!@$%^&*",
    "  leading whitespace",
]


@pytest.fixture(scope="module")
def bpe():
    return AutoTokenizer.from_pretrained(tiny_tokenizer("bpe"))


@pytest.fixture(scope="module")
def spm():
    return AutoTokenizer.from_pretrained(tiny_tokenizer("sentencepiece"))


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trips(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False)
    assert bpe.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trips(spm, text):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer("sentencepiece") / "tokenizer.model"))
    assert sp.decode(sp.encode(text)) == text
    ids = spm.encode(text, add_special_tokens=False)
    if text[0].isspace():
        # transformers' Llama tokenizer drops one leading space (as for real Llama checkpoints).
        assert spm.decode(ids) == text[1:]
    else:
        assert spm.decode(ids) == text
        assert ids == sp.encode(text), "transformers and sentencepiece disagree"


def test_bpe_is_gpt2_byte_level(bpe):
    spec = json.loads((tiny_tokenizer("bpe") / "tokenizer.json").read_text())
    pre = spec["pre_tokenizer"]
    assert pre["type"] == "ByteLevel" and pre["use_regex"] and not pre["add_prefix_space"]
    assert spec["decoder"]["type"] == "ByteLevel"
    words = [w for w, _ in bpe.backend_tokenizer.pre_tokenizer.pre_tokenize_str("Hi  there's 42x!")]
    assert words == ["Hi", "Ġ", "Ġthere", "'s", "Ġ42", "x", "!"]  # GPT-2's regex split


def test_bpe_special_tokens(bpe):
    assert bpe.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert bpe.bos_token_id == bpe.eos_token_id == 0
    assert bpe.encode("<|im_start|>user", add_special_tokens=False)[0] == 1


def test_sentencepiece_is_llama_shaped(spm):
    assert (spm.unk_token_id, spm.bos_token_id, spm.eos_token_id) == (0, 1, 2)
    assert spm("hi").input_ids[0] == 1  # BOS added, as Llama does
    pieces = spm.tokenize("2024 ☃")
    assert pieces[:5] == ["▁", "2", "0", "2", "4"]  # digits split
    assert "<0xE2>" in pieces  # unseen character falls back to bytes, no <unk>


def test_bpe_training_is_deterministic(tmp_path):
    texts = load_corpus().train[:300]
    train_bpe(texts, 400, tmp_path / "a")
    train_bpe(texts, 400, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
