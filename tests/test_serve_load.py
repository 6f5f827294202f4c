"""A bounded load test of `edgemoe serve` (the CLI, in its own process, on the demo model): 50
requests from 8 concurrent clients (no retries), streamed and not, some abandoned mid-stream, against
one generation + 4 waiting. Every request is answered or cleanly refused (429), and the server's RSS and open file descriptors do not grow
from one round to the next (the first round warms allocator pools and connection buffers).

    .venv/bin/python -m pytest -q -s -m slow tests/test_serve_load.py   # prints the numbers
"""
from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_fixtures import metrics, request, server_process

N_REQUESTS, N_WARM, N_CLIENTS, QUEUE = 50, 16, 8, 4
RSS_GROWTH_BYTES = 8 << 20  # steady state: allocator noise only (measured growth is printed)


def _proc(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kib * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _one(base: str, i: int) -> str:
    # a well-behaved client: on 429 it waits (Retry-After) and retries, twice at most (the openai default);
    # a refusal after that is final and counted as such
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=2, timeout=120)
    try:
        if i % 5 == 4:  # abandoned after two pieces: the client goes away
            stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "This module"}],
                                                    max_tokens=64, temperature=0, stream=True)
            _ = [c for _, c in zip(range(2), stream)]
            stream.close()
            return "abandoned"
        if i % 2:
            stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"The {i} module"}],
                                                    max_tokens=8, temperature=0.7, seed=i, stream=True)
            finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
            return "ok" if finish in (["stop"], ["length"]) else f"bad-finish-{finish}"
        done = client.completions.create(model="demo", prompt=f"Return the {i}", max_tokens=8, temperature=0)
        return "ok" if done.usage.completion_tokens >= 1 and done.choices[0].finish_reason else "bad-completion"
    except openai.RateLimitError:
        return "refused-429"
    except openai.APIStatusError as exc:
        return "refused-503" if exc.status_code == 503 else f"error-{exc.status_code}"
    except Exception as exc:  # a dropped connection, a timeout: never acceptable
        return f"failed-{type(exc).__name__}"
    finally:
        client.close()


def _round(base: str, n: int) -> tuple[Counter, float]:
    start = time.monotonic()
    with ThreadPoolExecutor(N_CLIENTS) as pool:
        outcomes = Counter(pool.map(lambda i: _one(base, i), range(n)))
    deadline = time.monotonic() + 30
    while request(base, "GET", "/health")[1]["generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return outcomes, time.monotonic() - start


@pytest.mark.slow
def test_bounded_load_answers_or_refuses_every_request_without_leaks():
    with server_process("--queue", str(QUEUE), "--ctx", "256") as (base, proc):
        warm, warm_s = _round(base, N_WARM)
        time.sleep(0.5)
        rss0, fds0 = _proc(proc.pid)
        outcomes, took_s = _round(base, N_REQUESTS)
        time.sleep(0.5)
        rss1, fds1 = _proc(proc.pid)
        served = metrics(base)
        assert request(base, "GET", "/health")[0] == 200
    for counts, n in ((warm, N_WARM), (outcomes, N_REQUESTS)):
        assert sum(counts.values()) == n
        assert set(counts) <= {"ok", "abandoned", "refused-429", "refused-503"}, counts
    assert outcomes["ok"] + outcomes["abandoned"] >= 2 * (QUEUE + 1), outcomes  # more than a full queue served
    generated = served["edgemoe_generated_tokens_total"]
    refusals = served.get('edgemoe_http_errors_total{status="429"}', 0)
    assert refusals >= warm["refused-429"] + outcomes["refused-429"]  # each final refusal is a 429 (retries add more)
    print(f"\nload: {N_CLIENTS} clients, --queue {QUEUE}: warm-up {N_WARM} requests {dict(warm)} in {warm_s:.1f} s, "
          f"then {N_REQUESTS} requests {dict(outcomes)} in {took_s:.1f} s; "
          f"{generated:.0f} tokens generated, {refusals:.0f} answered 429; server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB, "
          f"fds {fds0} -> {fds1}")
    assert fds1 <= fds0
    assert rss1 - rss0 <= RSS_GROWTH_BYTES
