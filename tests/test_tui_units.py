"""The chat's pure parts: prompt building, statistics folding, batching/throttling, parsing."""
from __future__ import annotations

import pytest
from test_tui_fakes import EXPERT_BYTES, ScriptedChat

from edgemoe.cli import main
from edgemoe.events import CacheStats, StepEvent
from edgemoe.memory import parse_budget
from edgemoe.tui.generation import generate_reply
from edgemoe.tui.prompt import Conversation, Sampling, Turn, Vocab, build_prompt, plain_text, read_sampling
from edgemoe.tui.stats import StatsTracker

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def words(text: str, add_bos: bool, special: bool) -> list[int]:
    """A toy tokenizer: one id per whitespace-separated word, BOS = 0."""
    return [0] * add_bos + [len(w) for w in text.split()]


def test_plain_continuation_is_one_running_document():
    turns = [Turn("user", "The os module"), Turn("assistant", " provides functions."), Turn("user", "It also")]
    assert plain_text(turns) == "The os module provides functions.\nIt also"
    assert plain_text(turns[:2] + [Turn("assistant", "\n")] + turns[2:]).endswith("functions.\nIt also")


def test_chat_template_renders_turns_and_keeps_special_tokens():
    seen = []
    vocab = Vocab(lambda text, add_bos, special: seen.append((text, add_bos, special)) or [1, 2],
                  bos_text="<s>", eos_text="<|im_end|>", chat_template=CHATML)
    conv = Conversation([Turn("user", "hi")])
    build_prompt(conv, vocab, 100)
    text, add_bos, special = seen[-1]
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert add_bos and special
    vocab = Vocab(vocab.encode, "<s>", "</s>", "{{ bos_token }}" + CHATML)
    build_prompt(conv, vocab, 100)
    assert seen[-1][0].startswith("<s>") and seen[-1][1] is False, "no second BOS when the template writes it"


def test_prompt_drops_oldest_turns_then_truncates():
    vocab = Vocab(words)
    conv = Conversation([Turn("user", "a " * 10), Turn("assistant", "b " * 10), Turn("user", "c " * 5)])
    assert len(build_prompt(conv, vocab, 100).ids) == 1 + 10 + 10 + 5
    fit = build_prompt(conv, vocab, 8)
    assert fit.dropped_turns == 2 and not fit.truncated and len(fit.ids) == 6
    cut = build_prompt(conv, vocab, 4)
    assert cut.truncated and cut.ids[0] == 0 and len(cut.ids) == 4
    with pytest.raises(ValueError, match="max tokens"):
        build_prompt(conv, vocab, 1)


def test_read_sampling_and_budget_say_what_is_wrong():
    assert read_sampling("0", "0.9", "64", 512) == Sampling(0.0, 0.9, 64)
    for args, message in ((("x", "1", "1"), "temperature"), (("1", "0", "1"), "top-p"),
                          (("1", "1", "600"), "between 1 and 510"), (("-1", "1", "1"), "greedy")):
        with pytest.raises(ValueError, match=message):
            read_sampling(*args, 512)
    assert parse_budget("50%", 1000) == 500
    assert parse_budget("2MiB", 1000) == 2 * 2**20
    with pytest.raises(ValueError, match="share"):
        parse_budget("half%", 1000)


def event(i: int, routing, resident, hits=0, misses=0, bytes_read=0) -> StepEvent:
    cache = CacheStats(hits=hits, misses=misses, bytes_read=bytes_read, resident_bytes=len(resident) * 10,
                       budget_bytes=100, resident_experts=tuple(sorted(resident)))
    return StepEvent(i, 0, "x", 0.0, 5.0, cache, 123, routing)


def test_tracker_per_layer_hits_come_from_routing_and_the_previous_resident_set():
    t = StatsTracker("edgemoe", True, (0, 1), 4, 160)
    t.add(event(0, ((0, 1), (2, 3)), {(0, 0), (0, 1), (1, 2), (1, 3)}, hits=0, misses=4, bytes_read=40))
    # layer 0 chooses 1 (resident) and 2 (not); layer 1 chooses 2 and 3 (both resident)
    t.add(event(1, ((1, 2), (2, 3)), {(0, 1), (0, 2), (1, 2), (1, 3)}, hits=3, misses=1, bytes_read=10))
    s = t.snapshot()
    assert s.layer_hit_rate == (0.5, 1.0)
    assert s.hit_rate == pytest.approx(3 / 8) and s.session_hit_rate == pytest.approx(3 / 8)
    assert s.bytes_per_token == 10, "the prefill's reads are not a decoded token's"
    assert s.heat[0][1] == 1.0 and s.heat[0][3] == 0.0 and s.tokens == 2 and s.peak_rss_bytes == 123
    assert s.resident == frozenset({(0, 1), (0, 2), (1, 2), (1, 3)})
    t.set_residency(CacheStats(resident_bytes=10, budget_bytes=20, resident_experts=((0, 1),)))
    s = t.snapshot()
    assert (s.resident_bytes, s.budget_bytes, s.resident) == (10, 20, frozenset({(0, 1)}))


def test_tracker_window_forgets_old_steps():
    t = StatsTracker("edgemoe", True, (0,), 2, 20, window=4)
    for i in range(4):
        t.add(event(i, ((0,),), set(), hits=0, misses=1))
    for i in range(4, 8):
        t.add(event(i, ((0,),), {(0, 0)}, hits=1, misses=0))
    s = t.snapshot()
    assert s.hit_rate == 1.0 and s.session_hit_rate == 0.5


def test_tracker_without_cache_reports_no_cache_numbers():
    t = StatsTracker("llama", False, (0, 1), 4, 160)
    t.add(StepEvent(0, 0, "x", 0.0, 0.0, CacheStats(), 5, ((0, 1), (2, 3))))
    s = t.snapshot()
    assert s.hit_rate is None and s.layer_hit_rate == () and s.bytes_per_token is None
    assert s.heat[1][2] == 1.0


def test_reply_text_is_batched_and_stats_throttled():
    backend = ScriptedChat([f"t{i} " for i in range(300)])
    texts, stats = [], []
    reply = generate_reply(backend, Conversation([Turn("user", "go")]), Sampling(0, 1, 300),
                           StatsTracker("edgemoe", True, (0, 1, 2, 3), 8, backend.expert_bytes_total),
                           texts.append, stats.append, lambda: False)
    assert reply.tokens == 300 and reply.text == "".join(f"t{i} " for i in range(300))
    assert "".join(texts) == reply.text
    assert len(texts) < 10 and len(stats) < 10, "300 instant tokens: a few batches, not 300 messages"
    assert stats[-1].tokens == 300 and not stats[-1].generating


def test_reply_stops_on_cancel_and_reports_errors():
    backend = ScriptedChat([f"t{i} " for i in range(50)])
    tracker = StatsTracker("edgemoe", True, (0, 1, 2, 3), 8, backend.expert_bytes_total)
    calls = []
    reply = generate_reply(backend, Conversation([Turn("user", "go")]), Sampling(0, 1, 50), tracker,
                           lambda t: None, lambda s: None, lambda: calls.append(1) or len(calls) >= 5)
    assert reply.cancelled and reply.tokens == 5 and reply.text == "t0 t1 t2 t3 t4 "
    failing = ScriptedChat(["a", "b", "c"], fail_after=2)
    reply = generate_reply(failing, Conversation([Turn("user", "go")]), Sampling(0, 1, 50), tracker,
                           lambda t: None, lambda s: None, lambda: False)
    assert reply.text == "ab" and "scripted failure" in reply.error


def test_scripted_backend_budget_matches_residency():
    backend = ScriptedChat(["a"])
    res = backend.set_budget(3 * EXPERT_BYTES)
    assert res.resident_bytes == 3 * EXPERT_BYTES <= res.budget_bytes


def test_cli_chat_rejects_bad_flags_before_starting(capsys):
    assert main(["chat", "--top-p", "2"]) == 2
    assert "top-p must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "--budget" in capsys.readouterr().out


class StubModel:
    """What vocab_of reads from a GGUFFile: metadata fields."""

    def __init__(self, fields: dict):
        self.fields = fields

    def field(self, key: str, default=None):
        return self.fields.get(key, default)


def test_vocab_reads_template_and_special_token_texts_from_gguf_metadata():
    from edgemoe.tui.backends import vocab_of

    assert vocab_of(StubModel({}), words).chat_template is None
    vocab = vocab_of(StubModel({"tokenizer.chat_template": CHATML, "tokenizer.ggml.tokens": ["<s>", "</s>", "a"],
                                "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}), words)
    assert (vocab.bos_text, vocab.eos_text, vocab.chat_template) == ("<s>", "</s>", CHATML)
