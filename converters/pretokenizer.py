"""A byte-level BPE's pre-tokenizer (tokenizer.json) -> the `tokenizer.ggml.pre` name under which
llama.cpp implements the same split, so llama.cpp (and our engine, which tokenizes through it)
cuts text into the same words as the checkpoint's own tokenizer.

llama.cpp's converter names pre-tokenizers by hashing the tokens of a test string, which needs
the checkpoint's tokenizer to run; we match the declared steps instead, exactly (regexes,
split behaviour, whether ByteLevel adds its own GPT-2 regex, whether digits are split). A
pre-tokenizer that is not in the table is refused: a wrong name converts fine and then
tokenizes differently, which nothing would report.

Normalizers are not matched: llama.cpp applies none, and the NFC normalizer Qwen's and
GPT-NeoX's tokenizers declare changes nothing on text that is already NFC (almost all text).
"""
from __future__ import annotations

import json
import unicodedata

from edgemoe.converters.errors import ConvertError

# Split regexes as the checkpoints' tokenizer.json files spell them.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM / V2: the letter class lists Unicode's cased-letter ranges. The files hold
# U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126 and U+212A there, which NFC maps to look-alikes
# (U+03CE ... U+004B), so both sides are compared after NFC.
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝ"
    "Ὗ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ"
    "𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+")
_DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


def _split(regex: str) -> tuple:
    return ("Split", unicodedata.normalize("NFC", regex), "Isolated", False)


_BYTES_ONLY = ("ByteLevel", False, False)  # byte mapping; the Splits before it did the splitting
# step signatures (see _step) -> llama.cpp name
_PRE_TOKENIZERS: dict[tuple, str] = {
    # GPT-2's regex inside ByteLevel: GPT-2, GPT-NeoX and OLMoE (llama.cpp's converter calls
    # OLMo's "olmo", which llama.cpp splits with this same regex)
    (("ByteLevel", False, True),): "gpt-2",
    # Qwen1.5, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE
    (_split(_QWEN2), _BYTES_ONLY): "qwen2",
    # Llama-3's (cl100k-style) split; the name depends on ignore_merges (below)
    (_split(_LLAMA3), _BYTES_ONLY): "llama-bpe",
    # DeepSeek LLM, DeepSeek-V2 / V2-Lite (the same 100k tokenizer)
    (_split("[\r\n]"), _split(_DEEPSEEK_LETTERS), _split(_DEEPSEEK_PUNCT), _split("\\s+$"), _split(_DEEPSEEK_CJK),
     ("Digits", True), ("ByteLevel", False, False)): "deepseek-llm",
}
# llama.cpp's "llama-bpe" also skips merges for words that are whole tokens (HF's BPE
# ignore_merges: true, as Llama-3 ships); "dbrx" is the same split without that (DBRX, OLMo-2).
_WITHOUT_IGNORE_MERGES = {"llama-bpe": "dbrx"}
IGNORES_MERGES = frozenset(_WITHOUT_IGNORE_MERGES)


def _step(s: dict) -> tuple:
    kind = s.get("type")
    if kind == "Split":
        pattern = s.get("pattern") or {}
        regex = pattern.get("Regex")
        return ("Split", unicodedata.normalize("NFC", regex) if regex is not None else ("String", pattern.get("String")),
                s.get("behavior"), bool(s.get("invert", False)))
    if kind == "ByteLevel":  # tokenizers' defaults: add_prefix_space and use_regex true
        return ("ByteLevel", bool(s.get("add_prefix_space", True)), bool(s.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(s.get("individual_digits", False)))
    return (kind, json.dumps(s, sort_keys=True))


def bpe_pre_name(spec: dict, where: str) -> str:
    """The llama.cpp pre-tokenizer name for tokenizer.json contents `spec` (`where` names the file)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    name = _PRE_TOKENIZERS.get(tuple(_step(s) for s in steps))
    if name is None:
        raise ConvertError(f"{where}: unknown pre-tokenizer {json.dumps(pre, ensure_ascii=False)[:300]}; supported: "
                           f"{', '.join(sorted(set(_PRE_TOKENIZERS.values()) | set(_WITHOUT_IGNORE_MERGES.values())))}"
                           " (the pre-tokenizers of GPT-2/GPT-NeoX/OLMoE, Qwen, Llama-3, DBRX and DeepSeek-V2)")
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges", False))
    if not ignore_merges and name in _WITHOUT_IGNORE_MERGES:
        return _WITHOUT_IGNORE_MERGES[name]
    if ignore_merges and name not in IGNORES_MERGES:
        raise ConvertError(f"{where}: the BPE model sets ignore_merges, which llama.cpp's {name!r} "
                           "pre-tokenizer does not do; this tokenizer cannot be converted exactly")
    return name
