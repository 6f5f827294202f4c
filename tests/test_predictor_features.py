"""Predictor inputs and the trace replay: routing state, feature layout, targets, the optional
router_logits trace field, and `compare_predictors` on a trace with a known routing process."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgemoe.predictor.base import Query, RoutingState
from edgemoe.bench.predictor_compare import compare_predictors, schedule
from edgemoe.predictor.base import RouterPredictor, RoutingShape
from edgemoe.predictor.features import FeatureSpec
from edgemoe.predictor.replay import queries, target
from edgemoe.trace import Trace, TraceError
from predictor_traces import synthetic_trace


def test_routing_state_knows_the_previous_token_only_in_decode():
    s = RoutingState(2)
    q = s.update(0, [[0, 1], [2, 3]], None)  # a 2-token prefill: no previous token for its last one
    assert q.prev is None and q.cur == ((2, 3), None)
    s.update(1, [[4, 5], [6, 7]], None)
    q = s.update(0, [[1, 2]], None)  # decode: the prefill's last token is the previous one
    assert q.prev == ((2, 3), (6, 7)) and q.cur == ((1, 2), None)
    q = s.update(1, [[3, 4]], None)
    assert q.cur == ((1, 2), (3, 4)) and q.index == 1


def test_feature_layout():
    spec = FeatureSpec(n_layers=2, n_experts=4)
    assert spec.size == 2 + 2 * 8 + 4 * 4
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32)
    v = spec.encode(Query(0, ((1, 2), None), ((0, 3), (1, 2)), logits))
    assert v[:2].tolist() == [1, 0]
    assert v[2:10].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]        # this token: layer 0 only
    assert v[10:18].tolist() == [1, 0, 0, 1, 0, 1, 1, 0]       # previous token, both layers
    np.testing.assert_allclose(v[18:22], 0.25)                 # softmax rows
    assert v[22] > v[23] and v[26:].sum() == 0                  # rows past the last layer stay zero
    assert FeatureSpec(2, 4, use_logits=False).encode(Query(1, ((1, 2), (0, 1)), None, logits))[18:].sum() == 0


def test_targets_wrap_into_the_next_token_and_stop_at_a_prefill():
    t = synthetic_trace(n_prompts=2, n_decode=3, n_layers=4)
    # steps: 0 prefill, 1-3 decode, 4 prefill, 5-7 decode
    assert target(t, 1, 2, 1) == (1, 3)
    assert target(t, 1, 3, 1) == (2, 0) and target(t, 1, 2, 3) == (2, 1)
    assert target(t, 0, 3, 1) == (1, 0)           # prefill -> its first decode step
    assert target(t, 3, 3, 1) is None             # the next step is another prompt's prefill
    assert target(t, 7, 3, 1) is None             # end of trace
    assert len(list(queries(t))) == 8 * 4


def test_router_logits_round_trip_and_old_traces_load(tmp_path):
    t = synthetic_trace(n_prompts=1, n_decode=4)
    t.save(tmp_path / "t.json")
    back = Trace.load(tmp_path / "t.json")
    assert back.router_logits == t.router_logits and back.steps == t.steps
    data = json.loads((tmp_path / "t.json").read_text())
    del data["router_logits"]  # a trace from before the field (or from llama.cpp)
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Trace.load(tmp_path / "old.json").router_logits is None
    data["router_logits"] = [{"0": [[0.0] * 3]}]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(TraceError, match="router_logits do not match"):
        Trace.load(tmp_path / "bad.json")


def test_router_speculation_is_exact_where_the_lookahead_is():
    t = synthetic_trace()
    sched = schedule(t, RouterPredictor(RoutingShape.of_trace(t)))
    # layers 1..3 come from exact look-ahead rows; layer 0 of the next token from the prior
    decode = sum(1 for n in t.tokens_per_step() if n == 1)
    assert sched.actual == decode * 4 * 2
    assert sched.correct >= decode * 3 * 2
    assert sched.predicted <= sched.actual


def test_compare_predictors_rows():
    t = synthetic_trace()
    budget = sum(t.expert_bytes.values()) // 2
    rows = {r.predictor: r for r in compare_predictors(t, budget)}
    assert set(rows) == {"none", "router", "prior", "cooccur", "learned@1", "learned"}
    assert rows["none"].precision is None and rows["none"].recall == 0.0 and rows["none"].prefetch_bytes_per_token == 0
    assert rows["router"].precision > 0.75 > rows["prior"].precision
    assert rows["router"].hit_rate > rows["none"].hit_rate
    assert 0 <= rows["router"].wasted_bytes_per_token <= rows["router"].prefetch_bytes_per_token
    assert rows["router"].belady_hit_rate == rows["none"].belady_hit_rate
    assert "no predictor file" in rows["learned"].note and rows["learned"].hit_rate is None
    plain = synthetic_trace(logits=False)
    rows = {r.predictor: r for r in compare_predictors(plain, budget, ("router", "prior"))}
    assert "no router_logits" in rows["router"].note and rows["prior"].precision is not None
