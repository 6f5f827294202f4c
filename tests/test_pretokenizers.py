"""Every pre-tokenizer the real checkpoints of the supported architectures ship converts to the
llama.cpp name that splits text the same way: a byte-level BPE is trained here with HF
`tokenizers` from each checkpoint's exact pre-tokenizer definition (tests/data), the tiny
qwen2moe checkpoint is converted with it, and llama.cpp's tokens (through the GGUF) must equal
the HF tokenizer's on mixed code/prose/unicode/digit strings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgemoe.converters.errors import ConvertError
from edgemoe.converters.pretokenizer import bpe_pre_name

SPECS = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "hf_pre_tokenizers.json").read_text()).items()
         if not k.startswith("_")}
VOCAB = 768  # the tiny checkpoints' vocab_size
# Training text beyond the English corpus, so merges exist inside every script and split class.
EXTRA_TRAIN = [
    "日本語のテキストと中文文本，我想在苹果工作一千三百天～ 한국어 텍스트와 문장입니다.",
    "Ελληνικά κείμενα και ρωσικий текст на Български, naïve café déjà vu Ωmega.",
    "ＡＢＣ全角！（括弧）「引用」。 ‘quotes’ “double” — dashes … ellipsis",
    "x = [1, 2, 3]; y = {'k': 42}\nif x: return 3.14159 * r ** 2  # area\r\n\tpass\n\n\n",
    "I've been told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like tea? We'Ve a'lL",
    "numbers 0 12 345 6789 1234567890 3.3 3..3 1e-10 0x1F 2026-12-01",
    "שלום עולם ומה שלומך היום, مرحبا بالعالم كيف حالك, สวัสดีชาวโลก ภาษาไทย, नमस्ते दुनिया",
]
# A whole-word token that no merge sequence builds (Llama-3's vocabulary has such tokens): with
# ignore_merges (llama.cpp's "llama-bpe") the word is that one token, without ("dbrx") its pieces.
WHOLE_WORD = "\u0120quizzaciously"  # " quizzaciously" in byte-level symbols
STRINGS = [
    "Hello, world! The os module provides a portable way of using operating system functionality.",
    "def f(x):\n    return x ** 2  # square\n\nclass Foo(Bar):\n\tpass\r\n\r\n",
    "numbers 1234567890 3.14159 1e-10 0x1F 333 3333 33333 ３４５",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, We'Ve a'lL DON'T",
    "unicode: naïve café, 日本語のテキスト, 中文1314151天～, 한국어, Ελληνικά, Български, emoji 🚀🔥 😶‍🌫️",
    "ＡＢＣ全角！（括弧）「引用」。 ‘quotes’ “double” —…",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nmixed \n \n\n \t \t\t \t\n  \n   end   ",
    "symbols: <>{}[]()!@#$%^&*_+-=|\\/~`'\"  ------======= '''''' ``````` \"\"\"\" ......!!!!!!??????",
    "CamelCaseIdentifiers and snake_case_names and SCREAMING_CASE; x=[1,2,3];print(x[::-1])#!",
    "שלום עולם, مرحبا بالعالم, สวัสดีชาวโลก, नमस्ते दुनिया; so quizzaciously done",
    "",
]


def _train(spec: dict, texts: list[str], out: Path):
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    from edgemoe.models.tokenizer import BPE_SPECIAL_TOKENS

    empty = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
             "normalizer": spec["normalizer"], "pre_tokenizer": spec["pre_tokenizer"], "post_processor": None,
             "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
             "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                       "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                       "ignore_merges": spec["ignore_merges"], "vocab": {}, "merges": []}}
    tok = Tokenizer.from_str(json.dumps(empty))
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB - 1, special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    saved = json.loads(tok.to_str())
    saved["model"]["ignore_merges"] = spec["ignore_merges"]  # the trainer resets it
    assert WHOLE_WORD not in saved["model"]["vocab"]
    saved["model"]["vocab"][WHOLE_WORD] = len(saved["model"]["vocab"])
    saved["pre_tokenizer"] = spec["pre_tokenizer"]  # as the checkpoint spells it (serialising adds defaults)
    out.write_text(json.dumps(saved, ensure_ascii=False))
    return Tokenizer.from_file(str(out))


@pytest.fixture(scope="module")
def train_texts():
    from edgemoe.models.corpus import load_corpus

    return load_corpus().train[:1500] + EXTRA_TRAIN * 200


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, tiny_checkpoint, train_texts, tmp_path_factory):
    """(HF tokenizer built from the real definition, llama.cpp tokenizer of the converted GGUF, spec)."""
    from edgemoe.converters.convert import convert
    from edgemoe.tokenizer import Tokenizer

    spec = SPECS[request.param]
    folder = tmp_path_factory.mktemp(request.param) / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen2moe"), folder)
    hf = _train(spec, train_texts, folder / "tokenizer.json")
    path = convert(folder, folder.parent / "m.gguf", "f16").path
    return hf, Tokenizer(path), spec


def test_converter_names_the_llama_cpp_pre_tokenizer(pair):
    _, ours, spec = pair
    assert ours.llm.metadata["tokenizer.ggml.pre"] == spec["pre"]


@pytest.mark.parametrize("text", STRINGS)
def test_llama_cpp_tokens_equal_the_checkpoint_tokenizer(pair, text):
    hf, ours, _ = pair
    assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids


def test_every_real_definition_is_recognised():
    for key, spec in SPECS.items():
        tokenizer_json = {"pre_tokenizer": spec["pre_tokenizer"], "model": {"ignore_merges": spec["ignore_merges"]}}
        assert bpe_pre_name(tokenizer_json, key) == spec["pre"], key


@pytest.mark.parametrize("change", [
    lambda pre: pre["pretokenizers"][-1].update(use_regex=True),        # ByteLevel would split a second time
    lambda pre: pre["pretokenizers"][0].update(behavior="Removed"),     # the split would drop text
    lambda pre: pre["pretokenizers"][0]["pattern"].update(Regex=r"\p{N}{1,2}"),
    lambda pre: pre["pretokenizers"].pop(5),                            # DeepSeek without its digit split
], ids=["byte-level-regex", "behavior", "regex", "missing-step"])
def test_a_changed_definition_is_refused(change):
    spec = json.loads(json.dumps(SPECS["deepseek-llm"]["pre_tokenizer"]))
    change(spec)
    with pytest.raises(ConvertError, match="unknown pre-tokenizer.*supported: .*deepseek-llm"):
        bpe_pre_name({"pre_tokenizer": spec, "model": {}}, "tokenizer.json")


def test_ignore_merges_without_llama_cpp_support_is_refused():
    with pytest.raises(ConvertError, match="ignore_merges"):
        bpe_pre_name({"pre_tokenizer": SPECS["qwen2"]["pre_tokenizer"], "model": {"ignore_merges": True}}, "t.json")
