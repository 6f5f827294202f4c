"""`edgemoe serve` on stock llama.cpp, and on a model whose GGUF has a chat template."""
from __future__ import annotations

import jinja2.sandbox
import openai
import pytest
from serve_fixtures import metrics, request, server_thread, with_chat_template

from edgemoe.demo import demo_gguf
from edgemoe.engine import Engine, EngineConfig
from edgemoe.serve import create_app
from edgemoe.serve.errors import APIError
from edgemoe.serve.prompts import chat_ids
from edgemoe.serve.schemas import ChatCompletionRequest
from edgemoe.tui.backends import open_backend
from edgemoe.tui.prompt import Vocab

PROMPT = "This module"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(path, ids: list[int], n: int) -> str:
    engine = Engine(path, EngineConfig())
    try:
        return "".join(e.text for e in engine.stream_generate(ids, n))
    finally:
        engine.close()


def test_llama_backend():
    backend = open_backend(demo_gguf(), "llama", EngineConfig(n_ctx=256))
    try:
        with server_thread(create_app(backend)) as url:
            c = _client(url)
            ids = backend.vocab.encode(PROMPT, True, False)
            stream = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=16, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
            chunks = list(stream)
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            # the demo's greedy parity between llama.cpp and the engine holds through the server
            assert text == _greedy(demo_gguf(), ids, 16)
            assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == len(ids)
            assert chunks[0].system_fingerprint == "edgemoe-llama-plain-continuation"
            follow = c.completions.create(model="demo", prompt=PROMPT + text + " and", max_tokens=4, temperature=0)
            assert follow.usage.prompt_tokens_details.cached_tokens >= len(ids)  # llama.cpp kept the prefix
            seen = metrics(url)
            assert seen["edgemoe_generated_tokens_total"] == 16 + follow.usage.completion_tokens
            assert not any(name.startswith("edgemoe_expert_") for name in seen), "no expert cache to report"
            assert "cache" not in follow.model_extra["edgemoe"]
    finally:
        backend.close()


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    return with_chat_template(demo_gguf(), tmp_path_factory.mktemp("tpl") / "demo-chatml.gguf", CHATML)


def test_chat_template_renders_messages(templated):
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "This "}, {"type": "text", "text": "module"}]}]
    # oracle: the template rendered by jinja2's sandbox here, tokenized with its markers special
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(CHATML).render(
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "This module"}],
        add_generation_prompt=True)
    backend = open_backend(templated, "edgemoe", EngineConfig(n_ctx=256))
    try:
        ids = backend.engine.tokenizer.encode(rendered, add_bos=True, special=True)
        with server_thread(create_app(backend)) as url:
            c = _client(url)
            done = c.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=0)
            assert done.system_fingerprint == "edgemoe-edgemoe-chat-template"
            assert done.model_extra["edgemoe"]["prompt_format"] == "chat-template"
            assert done.usage.prompt_tokens == len(ids)
            assert done.choices[0].message.content == _greedy(templated, ids, 12)
            assert request(url, "GET", "/v1/models")[1]["data"][0]["prompt_format"] == "chat-template"
    finally:
        backend.close()


@pytest.mark.parametrize("template, says", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),  # the sandbox refuses attribute escapes
])
def test_a_failing_or_unsafe_template_is_a_400(template, says):
    vocab = Vocab(lambda text, add_bos, special: [1], "<s>", "</s>", template)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(APIError) as info:
        chat_ids(req, vocab)
    assert info.value.status == 400 and says in info.value.message and info.value.param == "messages"
