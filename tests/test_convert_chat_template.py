"""The converters carry a checkpoint's chat template into the GGUF (`tokenizer.chat_template`),
and `edgemoe serve` / `edgemoe chat` render conversations with it (tui.backends.vocab_of,
tui.prompt.encode_turns: jinja2 sandboxed, markers kept as special tokens).

HF checkpoints keep the template in tokenizer_config.json as a string, or as a list of named
templates (`[{"name": "default", "template": ...}, {"name": "tool_use", ...}]`): the default is
written as `tokenizer.chat_template`, the others as `tokenizer.chat_template.<name>` (llama.cpp's
keys). Both tokenizer families (byte-level BPE, SentencePiece) write it through gguf-py's
SpecialVocab (converters/vocab.py); transformers >= 4.43 saves the template as
chat_template.jinja, which is read too. Oracle: transformers' `apply_chat_template` on the
checkpoint folder: the same text, and the same ids (SentencePiece: but for the spaces llama.cpp
puts after special tokens, see below).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgemoe.converters.convert import convert
from edgemoe.gguf_file import GGUFFile

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TOOL_USE = "{{ bos_token }}tools: {{ messages | length }}"
MESSAGES = [{"role": "user", "content": "What does len() return?"},
            {"role": "assistant", "content": "The number of items."},
            {"role": "user", "content": "And of a dict?"}]


def _with_template(tiny_checkpoint, arch: str, out: Path, template, jinja: bool = False) -> Path:
    """models/tiny.py's checkpoint of `arch` with `chat_template` in its tokenizer_config.json or
    in chat_template.jinja (None: the stock checkpoint, which has none)."""
    shutil.copytree(tiny_checkpoint(arch), out)
    if jinja:
        (out / "chat_template.jinja").write_text(template)
    elif template is not None:
        path = out / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    return out


def _rendered(gguf_path: Path) -> tuple[str, list[int]]:
    """The text and the ids the server and the chat prompt the model with for MESSAGES."""
    from edgemoe.tokenizer import Tokenizer
    from edgemoe.tui.backends import vocab_of
    from edgemoe.tui.prompt import Turn, encode_turns, template_text

    tok = Tokenizer(gguf_path)
    vocab = vocab_of(GGUFFile(gguf_path), tok.encode)
    turns = [Turn(m["role"], m["content"]) for m in MESSAGES]
    return template_text(turns, vocab), encode_turns(turns, vocab)


def _hf(ckpt: Path) -> tuple[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return (tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
            list(ids["input_ids"] if hasattr(ids, "keys") else ids))


def _token_id(ckpt: Path, text: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ckpt / "tokenizer.json")).token_to_id(text)


@pytest.mark.parametrize("arch,form", [("qwen3moe", "string"), ("qwen3moe", "jinja"), ("mixtral", "named")])
def test_chat_template_is_written_and_renders_as_transformers_does(tiny_checkpoint, tmp_path, arch, form):
    """A string template (byte-level BPE checkpoint, ChatML; in the config or in
    chat_template.jinja) and the list of named templates (SentencePiece checkpoint, an [INST]
    default and a tool_use one)."""
    template = CHATML if form != "named" else [{"name": "default", "template": INST},
                                                {"name": "tool_use", "template": TOOL_USE}]
    ckpt = _with_template(tiny_checkpoint, arch, tmp_path / "hf", template, jinja=form == "jinja")
    convert(ckpt, tmp_path / "model.gguf", "f32")
    model = GGUFFile(tmp_path / "model.gguf")
    if form != "named":
        assert model.field("tokenizer.chat_template") == CHATML
    else:
        assert model.field("tokenizer.chat_template") == INST
        assert model.field("tokenizer.chat_template.tool_use") == TOOL_USE
        assert list(model.field("tokenizer.chat_templates")) == ["tool_use"]
    text, ids = _rendered(tmp_path / "model.gguf")
    hf_text, hf_ids = _hf(ckpt)
    assert text == hf_text
    if arch == "qwen3moe":
        assert ids == hf_ids
        assert ids.count(_token_id(ckpt, "<|im_start|>")) == 4  # three turns and the generation prompt
    else:
        # SentencePiece: llama.cpp puts a "▁" before the text after each special token (Mixtral's
        # training format, HF's legacy=True); this checkpoint says legacy=False, so HF does not:
        # the ids differ by those spaces. The markers are still one special token each.
        bos, eos = _token_id(ckpt, "<s>"), _token_id(ckpt, "</s>")
        assert ids[0] == bos and ids.count(bos) == 1 and ids.count(eos) == 1
        assert [i for i in ids if i != _token_id(ckpt, "▁")] == [i for i in hf_ids if i != _token_id(ckpt, "▁")]


def test_a_checkpoint_without_a_template_gets_none(tiny_checkpoint, tmp_path):
    """No template, no key: serve and chat then continue plain text (their documented fallback)."""
    ckpt = _with_template(tiny_checkpoint, "qwen3moe", tmp_path / "hf", None)
    assert "chat_template" not in json.loads((ckpt / "tokenizer_config.json").read_text())
    convert(ckpt, tmp_path / "model.gguf", "f32")
    assert GGUFFile(tmp_path / "model.gguf").field("tokenizer.chat_template") is None
