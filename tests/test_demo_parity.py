"""The embedded demo model: its q8_0 GGUF continues prompts greedily exactly as transformers
does on the committed checkpoint, through llama.cpp and through the edgemoe engine."""
from __future__ import annotations

import pytest
import torch

from edgemoe.converters.convert import convert
from edgemoe.models import demo_dir

PROMPTS = ["The return value of", "def ", "This module provides"]
N_TOKENS = 32


@pytest.fixture(scope="module")
def demo_q8(tmp_path_factory):
    return convert(demo_dir(), tmp_path_factory.mktemp("demo") / "demo-q8_0.gguf", "q8_0").path


@pytest.fixture(scope="module")
def hf_greedy():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_dir(), dtype=torch.float32).eval()

    def run(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                                 do_sample=False)
        return out[0, len(ids):].tolist()
    return run


@pytest.mark.parametrize("prompt", PROMPTS)
def test_q8_0_greedy_continuation_equals_transformers(demo_q8, hf_greedy, prompt):
    from edgemoe.engine import Engine
    from edgemoe.llama_backend import open_llama

    engine = Engine(demo_q8)
    ids = engine.tokenizer.encode(prompt)
    want = hf_greedy(ids)
    ours = [e.token for e in engine.stream_generate(ids, N_TOKENS, stop_at_eos=False)]
    engine.close()
    llm = open_llama(demo_q8, n_ctx=128)
    llm.reset()
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == N_TOKENS:
            break
    assert theirs == want
    assert ours == want
