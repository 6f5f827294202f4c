"""Tokenizer -> GGUF metadata, so llama.cpp (and our engine, which tokenizes through it)
produces exactly the tokens the HF tokenizer does.

Two families: byte-level BPE from tokenizer.json (`tokenizer.ggml.model = "gpt2"`) and
SentencePiece from tokenizer.model (`"llama"`, as Mixtral uses). Special token ids and the chat
template (tokenizer_config.json's `chat_template`, which `edgemoe serve` and `edgemoe chat` render)
are written by gguf-py's SpecialVocab, as llama.cpp's converter does (docs/FORMAT.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import TokenType

from edgemoe.converters.errors import ConvertError
from edgemoe.converters.pretokenizer import bpe_pre_name


def write_vocab(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """Add the tokenizer of checkpoint `folder`; returns the tokenizer model name written."""
    if (folder / "tokenizer.model").is_file():
        _write_sentencepiece(w, folder, vocab_size)
        return "llama"
    if (folder / "tokenizer.json").is_file():
        _write_bpe(w, folder, vocab_size)
        return "gpt2"
    raise ConvertError(f"{folder} has neither tokenizer.json nor tokenizer.model; "
                       "copy the tokenizer files of the original model into it")


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path} is not valid JSON ({exc}); copy the tokenizer files of the original "
                           "model into the checkpoint folder") from None


def _write_bpe(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    spec = _json(folder / "tokenizer.json")
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{folder / 'tokenizer.json'}: tokenizer model {model.get('type')!r} is not supported "
                           "(byte-level BPE or a SentencePiece tokenizer.model are)")
    by_id: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    n = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    toktypes = [types.get(i, TokenType.NORMAL if i in by_id else TokenType.UNUSED) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(bpe_pre_name(spec, str(folder / "tokenizer.json")))
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    gguf.SpecialVocab(folder, load_merges=False, n_vocab=n).add_to_gguf(w, quiet=True)


def _write_sentencepiece(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    try:
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError as exc:
        raise ConvertError("a SentencePiece tokenizer.model needs sentencepiece and protobuf, which `pip install "
                           "edgemoe` installs; reinstall edgemoe into this environment") from exc
    path = folder / "tokenizer.model"
    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        sp = SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # sentencepiece raises bare RuntimeError/DecodeError on bad files
        raise ConvertError(f"{path} is not a readable SentencePiece model: {exc}") from exc
    n = max(vocab_size, sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-1000.0] * n
    toktypes = [TokenType.UNUSED] * n
    for i in range(sp.vocab_size()):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        toktypes[i] = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                       else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                       else TokenType.NORMAL)
    added = folder / "added_tokens.json"
    if added.is_file():
        for piece, i in _json(added).items():
            if i < n:
                tokens[i], scores[i], toktypes[i] = piece.encode("utf-8"), -1000.0, TokenType.USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    gguf.SpecialVocab(folder, n_vocab=n).add_to_gguf(w, quiet=True)
