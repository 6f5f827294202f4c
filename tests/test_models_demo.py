"""The committed demo checkpoint (the default model of `edgemoe chat`) and its training recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgemoe.models import demo_dir
from edgemoe.models.corpus import load_corpus
from edgemoe.models.demo_report import evaluate
from edgemoe.models.train_demo import DemoSpec, token_stream, train_demo

MAX_COMMITTED_BYTES = 40_000_000


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForCausalLM.from_pretrained(demo_dir(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo_dir())


def test_demo_folder_is_complete_and_small():
    names = {p.name for p in demo_dir().iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in demo_dir().iterdir()) <= MAX_COMMITTED_BYTES


def test_demo_config_matches_recipe():
    config = json.loads((demo_dir() / "config.json").read_text())
    spec = DemoSpec()
    assert config["architectures"] == ["MixtralForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "num_local_experts",
                "num_experts_per_tok"):
        assert config[key] == getattr(spec, key), key
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0  # K-quants


def test_demo_model_learned_the_corpus(demo):
    model, _ = demo
    tok = Tokenizer.from_file(str(demo_dir() / "tokenizer.json"))
    heldout = token_stream(tok, load_corpus().heldout)[: 4 * DemoSpec().context]
    ppl, n_tokens = evaluate(model, heldout, DemoSpec().context)
    assert n_tokens == 4 * (DemoSpec().context - 1)
    # Uniform over the vocabulary is 4096; the committed model scores ~150 on this slice.
    assert ppl < 300, f"held-out perplexity {ppl:.1f}: the demo model did not learn"


def test_demo_model_generates_text(demo):
    model, tok = demo
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("Return the", add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert len(text.strip()) > 0


@pytest.mark.slow
def test_train_demo_recipe_runs(tmp_path):
    report = train_demo(tmp_path, minutes=5, steps=2, precision="f32")
    assert report["steps"] == 2 and report["tokens_seen"] == 2 * 16 * 256
    assert math.isfinite(report["heldout_ppl"])
    assert (tmp_path / "README.md").read_text().count("```text") == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_local_experts == 8
