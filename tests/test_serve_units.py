"""Pieces of `edgemoe serve` without a model: stop sequences across streamed pieces, the
Prometheus text, the context budget."""
from __future__ import annotations

import re

import pytest

from edgemoe.events import CacheStats, StepEvent
from edgemoe.serve.errors import APIError
from edgemoe.serve.metrics import Metrics, ServerState
from edgemoe.serve.prompts import token_budget
from edgemoe.serve.runner import StopText


def _feed(stops, pieces):
    s, out = StopText(tuple(stops)), []
    for piece in pieces:
        text, hit = s.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + s.flush(), False


def test_stop_sequence_split_across_pieces_is_cut_whole():
    assert _feed(["lo w"], ["Hel", "lo", " wor", "ld"]) == ("Hel", True)
    assert _feed(["\n\n", "END"], ["a\n", "b E", "N", "D c"]) == ("a\nb ", True)


def test_a_held_back_prefix_that_never_completes_is_sent():
    s = StopText(("abc",))
    assert s.feed("xab") == ("x", False)  # "ab" could start "abc": held
    assert s.feed("d") == ("abd", False)
    assert _feed(["abc"], ["x", "ab"]) == ("xab", False)  # flushed at the end


def test_prometheus_text():
    m = Metrics('demo "q8"', "edgemoe", has_cache=True)
    cache = CacheStats(hits=3, misses=1, bytes_read=4096, stall_s=0.5, prefetch_issued=2, prefetch_hits=1)
    m.add(StepEvent(0, 5, "a", 0.2, 0.0, cache, prompt_tokens=7, kv_reused_tokens=4))
    m.add(StepEvent(1, 6, "b", 0.3, 10.0, cache))
    m.add(StepEvent(2, 0, "", 0.4, 10.0, cache, finished=True, finish_reason="stop"))  # end of sequence
    m.request_done("chat", "ok", 0.1)
    text = m.render(ServerState(False, 0, 8, CacheStats(resident_bytes=10, budget_bytes=20,
                                                        resident_bytes_per_layer=(4, 6))))
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP \w+ .+|TYPE \w+ (counter|gauge|summary))", line), line
            continue
        match = re.fullmatch(r'(\w+)(\{(\w+="(\\.|[^"\\])*",?)*\})? (\S+)', line)
        assert match, line
        samples[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    assert samples['edgemoe_info{model="demo \\"q8\\"",backend="edgemoe"}'] == 1
    assert samples["edgemoe_generated_tokens_total"] == 2  # the end-of-sequence token is not one
    assert samples["edgemoe_prompt_tokens_total"] == 7 and samples["edgemoe_prompt_tokens_reused_total"] == 4
    assert samples["edgemoe_expert_hits_total"] == 9 and samples["edgemoe_expert_misses_total"] == 3
    assert samples["edgemoe_expert_hit_rate"] == pytest.approx(0.75)
    assert samples["edgemoe_prefetch_accuracy"] == pytest.approx(0.5)
    assert samples["edgemoe_expert_stall_seconds_total"] == pytest.approx(1.5)
    assert samples['edgemoe_expert_layer_resident_bytes{layer="1"}'] == 6
    assert samples['edgemoe_requests_total{endpoint="chat",outcome="ok"}'] == 1
    assert samples["edgemoe_time_to_first_token_seconds_count"] == 1
    assert samples["edgemoe_decode_tokens_per_second"] == 10.0
    for name in {re.match(r"\w+", k).group() for k in samples}:
        base = re.sub(r"_(sum|count)$", "", name)
        assert f"# TYPE {base} " in text, name


def test_token_budget():
    assert token_budget(10, None, 100, None) == 90      # chat: the rest of the context
    assert token_budget(10, None, 100, 16) == 16        # completions: the API's default
    assert token_budget(95, None, 100, 16) == 5
    assert token_budget(10, 90, 100, None) == 90
    for n_prompt, requested in ((10, 91), (100, None), (0, 5)):
        with pytest.raises(APIError) as info:
            token_budget(n_prompt, requested, 100, None)
        assert info.value.status == 400
