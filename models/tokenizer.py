"""Train the two tokenizer families our reference checkpoints use, offline, on the demo corpus.

- `train_bpe`: byte-level BPE as GPT-2 / Qwen / DeepSeek / OLMoE ship it (HF `tokenizers`). The
  pre-tokenizer is exactly GPT-2's regex because the GGUF writer declares
  `tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre = "gpt-2"`, and llama.cpp then splits text
  with that regex; any other split would tokenize differently in llama.cpp than in transformers.
- `train_sentencepiece`: a SentencePiece BPE model shaped like Llama/Mixtral's (byte fallback,
  `<unk>`=0 `<s>`=1 `</s>`=2, split digits, dummy prefix, no normalisation), written as
  `tokenizer.model` (what GGUF `tokenizer.ggml.model = "llama"` is built from) plus the
  `tokenizer.json` transformers derives from it, so loading needs no sentencepiece install.

Both write a folder that `transformers.AutoTokenizer.from_pretrained(folder)` loads offline.
Known transformers behaviour kept as in real Llama checkpoints: its Llama tokenizer drops one
leading space of a text that starts with whitespace (sentencepiece keeps it); everything else
tokenizes identically to sentencepiece.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BPE_SPECIAL_TOKENS = (EOT, IM_START, IM_END)  # ids 0, 1, 2
SPM_MAX_SENTENCE_CHARS = 16384


def _write_config(out_dir: Path, config: dict) -> None:
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
              model_max_length: int = 2048) -> Path:
    """Train a GPT-2-style byte-level BPE; `vocab_size` counts the 256 byte symbols and the
    3 special tokens. Writes tokenizer.json + tokenizer_config.json into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # use_regex=True is the GPT-2 split regex: llama.cpp's pre = "gpt-2" must see the same words.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_config(out_dir, {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    })
    return out_dir


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on sentences; a docstring line is the natural one. Blank lines carry no
    merges and over-long lines would be dropped by the trainer, so both are skipped/truncated."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line[:SPM_MAX_SENTENCE_CHARS]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        model_max_length: int = 2048) -> Path:
    """Train a Llama-style SentencePiece BPE; writes tokenizer.model, tokenizer.json and
    tokenizer_config.json (LlamaTokenizer) into `out_dir`."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_prefix=str(out_dir / "tokenizer"),  # -> tokenizer.model (+ tokenizer.vocab, removed)
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # Llama: unseen characters become <0xNN> byte pieces, never <unk>
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # code indentation: runs of "▁"
        character_coverage=0.9995,  # the rest falls back to bytes; keeps small vocabs trainable
        max_sentence_length=SPM_MAX_SENTENCE_CHARS,
        num_threads=1,  # single-threaded: the merge order is then reproducible
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    _write_config(out_dir, {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    })
    _add_tokenizer_json(out_dir)
    return out_dir


def _add_tokenizer_json(out_dir: Path) -> None:
    """Let transformers convert tokenizer.model once and keep its tokenizer.json next to it (as hub
    Llama/Mixtral folders do), so later loads need neither sentencepiece nor protobuf."""
    from transformers import AutoTokenizer

    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_config(out_dir, config)  # ours, not the re-serialised one: it names the class we chose
