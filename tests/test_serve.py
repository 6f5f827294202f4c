"""`edgemoe serve` on the demo model, spoken to with the official `openai` client (and raw HTTP
for requests a client library would not send). Oracle for every text: the engine's own greedy
continuation of the same prompt, from a separate engine that prefills it whole."""
from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import openai
import pytest
from serve_fixtures import metrics, request, server_thread

from edgemoe.demo import demo_gguf
from edgemoe.engine import Engine, EngineConfig
from edgemoe.serve import ServeOptions, create_app
from edgemoe.tui.backends import open_backend

N_CTX = 256
PROMPT = "This module"  # the demo continues it for 100+ tokens without EOS (greedy)


@pytest.fixture(scope="module")
def backend():
    chat = open_backend(demo_gguf(), "edgemoe", EngineConfig(n_ctx=N_CTX))
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def base(backend):
    with server_thread(create_app(backend)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oracle():
    engine = Engine(demo_gguf(), EngineConfig(n_ctx=N_CTX))

    def greedy(prompt: str | list[int], n: int) -> tuple[list[int], str]:
        ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        events = list(engine.stream_generate(ids, n))
        return ids, "".join(e.text for e in events)

    yield greedy
    engine.close()


def wait_idle(base: str, timeout_s: float = 10.0) -> float:
    """Seconds until /health says no generation runs."""
    start = time.monotonic()
    while request(base, "GET", "/health")[1]["generating"]:
        assert time.monotonic() - start < timeout_s, "the generation did not stop"
        time.sleep(0.02)
    return time.monotonic() - start


def test_models_and_health(client, base):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    status, body, _ = request(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["backend"] == "edgemoe"


def test_streamed_chat_completion(client, oracle):
    ids, want = oracle(PROMPT, 24)
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 10, "streamed piece by piece"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["length"]
    # the demo has no chat template: the response says it is plain continuation
    assert all(c.system_fingerprint == "edgemoe-edgemoe-plain-continuation" for c in chunks)
    note = finish[0].model_extra["edgemoe"]
    assert note["prompt_format"] == "plain-continuation" and "no chat template" in note["note"]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 24)


def test_completion_and_kv_prefix_reuse(client, oracle):
    ids, want = oracle(PROMPT, 16)
    first = client.completions.create(model="demo", prompt=PROMPT, max_tokens=16, temperature=0)
    assert first.choices[0].text == want and first.choices[0].finish_reason == "length"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (len(ids), 16)
    # the next request extends the previous prompt and its completion: only the new part is prefilled
    follow = PROMPT + want + " and"
    follow_ids, want_follow = oracle(follow, 12)
    second = client.completions.create(model="demo", prompt=follow, max_tokens=12, temperature=0)
    assert second.choices[0].text == want_follow
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens == len(follow_ids)
    assert len(ids) <= reused < len(follow_ids)
    ext = second.model_extra["edgemoe"]
    assert ext["kv_reused_tokens"] == reused and ext["prefilled_tokens"] == len(follow_ids) - reused
    # token ids as the prompt, with a stop sequence cut out of the text
    cut = want_follow.split()[1]
    stopped = client.completions.create(model="demo", prompt=follow_ids, max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].text == want_follow[:want_follow.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_metrics_move_with_tokens(client, base):
    before = metrics(base)
    done = client.completions.create(model="demo", prompt="The sys module", max_tokens=10, temperature=0)
    after = metrics(base)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("edgemoe_generated_tokens_total") == done.usage.completion_tokens > 0
    assert delta("edgemoe_prompt_tokens_total") == done.usage.prompt_tokens
    assert delta('edgemoe_requests_total{endpoint="completions",outcome="ok"}') == 1
    cache = done.model_extra["edgemoe"]["cache"]  # the request's own sums of the engine's counters
    assert delta("edgemoe_expert_hits_total") == cache["hits"]
    assert delta("edgemoe_expert_misses_total") == cache["misses"]
    assert delta("edgemoe_expert_read_bytes_total") == cache["bytes_read"]
    assert cache["hits"] + cache["misses"] > 0
    looked_up = after["edgemoe_expert_hits_total"] + after["edgemoe_expert_misses_total"]
    assert after["edgemoe_expert_hit_rate"] == pytest.approx(after["edgemoe_expert_hits_total"] / looked_up)
    assert 0 < after["edgemoe_expert_resident_bytes"] <= after["edgemoe_expert_budget_bytes"]
    assert after["edgemoe_peak_rss_bytes"] >= after["edgemoe_rss_bytes"] > 0
    assert after["edgemoe_decode_tokens_per_second"] > 0
    assert delta("edgemoe_time_to_first_token_seconds_count") == 1


def test_cancelled_stream_frees_the_engine(client, base):
    before = metrics(base)
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=200, temperature=0, stream=True)
    pieces = [c for _, c in zip(range(4), stream)]
    assert len(pieces) == 4
    stream.close()  # the client goes away mid-generation
    assert wait_idle(base) < 5
    after = metrics(base)
    assert after['edgemoe_requests_total{endpoint="chat",outcome="cancelled"}'] - \
        before.get('edgemoe_requests_total{endpoint="chat",outcome="cancelled"}', 0) == 1
    assert after["edgemoe_generated_tokens_total"] - before["edgemoe_generated_tokens_total"] < 100
    start = time.monotonic()
    done = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, temperature=0)
    assert done.usage.completion_tokens == 4 and time.monotonic() - start < 10


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(base):
    before = metrics(base)
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 250, "temperature": 0}),
                 headers={"content-type": "application/json"})
    deadline = time.monotonic() + 10
    while not request(base, "GET", "/health")[1]["generating"]:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away without reading the answer
    conn.close()
    assert wait_idle(base) < 5
    after = metrics(base)
    key = 'edgemoe_requests_total{endpoint="completions",outcome="cancelled"}'
    assert after[key] - before.get(key, 0) == 1
    assert after["edgemoe_generated_tokens_total"] - before["edgemoe_generated_tokens_total"] < 250


def _error(status: int, body: dict, want_status: int, param: str | None = None) -> dict:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, base):
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    err = _error(*request(base, "POST", chat, b'{"messages": [')[:2], 400)
    assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
    _error(*request(base, "POST", chat, {"messages": msgs, "temperature": "hot"})[:2], 400, "temperature")
    _error(*request(base, "POST", chat, {"messages": "hi"})[:2], 400, "messages")
    _error(*request(base, "POST", chat, {"messages": msgs, "max_tokens": 1.5})[:2], 400, "max_tokens")
    _error(*request(base, "POST", chat, {"messages": msgs, "stream": "yes"})[:2], 400, "stream")
    _error(*request(base, "POST", chat, {"messages": [{"role": "robot", "content": "x"}]})[:2], 400,
           "messages.0.role")
    _error(*request(base, "POST", chat, {"messages": msgs, "n": 2})[:2], 400, "n")
    _error(*request(base, "POST", "/v1/completions", {"prompt": [10**9]})[:2], 400, "prompt")
    _error(*request(base, "POST", "/v1/completions", {"prompt": ["a", "b"]})[:2], 400, "prompt")
    err = _error(*request(base, "POST", chat, {"messages": msgs, "max_tokens": N_CTX})[:2], 400)
    assert err["code"] == "context_length_exceeded" and str(N_CTX) in err["message"]
    big = {"prompt": "x" * (2 << 20)}
    assert _error(*request(base, "POST", "/v1/completions", big)[:2], 413)["code"] == "body_too_large"
    _error(*request(base, "POST", "/v1/completions", big, chunked=True)[:2], 413)
    _error(*request(base, "GET", "/v1/nothing")[:2], 404)
    _error(*request(base, "GET", "/v1/models/other")[:2], 404, "model")
    with pytest.raises(openai.BadRequestError) as info:  # what a client sees for a prompt beyond the context
        client.completions.create(model="demo", prompt="word " * N_CTX, max_tokens=8)
    assert "maximum context length" in str(info.value)
    done = client.chat.completions.create(model="demo", messages=msgs, max_tokens=3, temperature=0)
    assert done.usage.completion_tokens >= 1
    counted = metrics(base)
    assert counted['edgemoe_http_errors_total{status="400"}'] >= 11
    assert counted['edgemoe_http_errors_total{status="413"}'] == 2


def test_queue_full_is_refused_with_429(backend, base):
    wait_idle(base)
    with server_thread(create_app(backend, ServeOptions(max_waiting=0))) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = c.completions.create(model="demo", prompt=PROMPT, max_tokens=200, temperature=0, stream=True)
        next(iter(stream))  # generating now; nothing may wait
        status, body, headers = request(url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        err = _error(status, body, 429)
        assert err["code"] == "queue_full" and headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="demo", prompt="x", max_tokens=2)
        stream.close()
        wait_idle(url)
        assert c.completions.create(model="demo", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_api_key(backend, base):
    wait_idle(base)
    with server_thread(create_app(backend, ServeOptions(api_key="s3cret"))) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert request(url, "GET", "/metrics")[0] == 401
        assert request(url, "GET", "/health")[0] == 200  # liveness stays open
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="demo", prompt="x", max_tokens=2).usage.completion_tokens >= 1
