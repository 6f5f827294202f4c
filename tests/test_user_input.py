"""The one reader of each kind of user input every command shares: byte sizes, budgets and
budget-share lists (edgemoe.memory), prompt files (edgemoe.commands.common.read_prompts); and
peak RSS where /proc is missing (ru_maxrss: KiB on Linux, bytes on macOS)."""
from __future__ import annotations

import resource

import pytest

from edgemoe import memory
from edgemoe.commands.common import PromptFileError, read_prompts
from edgemoe.memory import SizeError, parse_budget, parse_bytes, parse_shares


def test_sizes_budgets_and_shares():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5g") == 3 * 2**29
    assert parse_bytes(" 1500 ") == 1500 and parse_bytes(7) == 7
    for bad, message in (("lots", "byte size"), ("12XB", "byte size"), ("-5MiB", "negative"), ("50%", "byte size")):
        with pytest.raises(SizeError, match=message):
            parse_bytes(bad)
    assert parse_budget("50%", 1000) == 500 and parse_budget("8MiB", 1000) == 8 * 2**20
    calls = []
    total = lambda: calls.append(1) or 4000  # noqa: E731
    assert parse_budget("2MiB", total) == 2 * 2**20 and not calls  # bytes: the total is never read
    assert parse_budget("25%", total) == 1000 and calls == [1]
    for bad, message in (("half%", "share"), ("0%", "above 0%"), ("150%", "at most 100%")):
        with pytest.raises(SizeError, match=message):
            parse_budget(bad, 1000)
    assert parse_shares("100,75, 50,12.5%") == (1.0, 0.75, 0.5, 0.125)
    for bad, message in (("100,abc", "'abc'"), ("100,0", "not in \\(0, 100\\]"), ("", "percentage")):
        with pytest.raises(SizeError, match=message):
            parse_shares(bad)
    assert issubclass(SizeError, ValueError)


def test_prompt_files(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("first prompt\n\n  \nsecond one\n", encoding="utf-8")
    assert read_prompts(good) == ["first prompt", "second one"]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for path, message in ((blank, "holds no prompt"), (tmp_path / "missing.txt", "does not exist"),
                          (tmp_path, "is a folder"), (latin, "not UTF-8 text \\(byte 3\\)")):
        with pytest.raises(PromptFileError, match=message):
            read_prompts(path)


@pytest.mark.parametrize("platform,scale", [("linux", 1024), ("darwin", 1)])
def test_peak_rss_without_proc_reads_ru_maxrss_in_the_platform_unit(monkeypatch, platform, scale):
    monkeypatch.setattr(memory, "_status_kib", lambda field: None)
    monkeypatch.setattr(memory.sys, "platform", platform)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = memory.peak_rss_bytes()
    assert before * scale <= got <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale  # a peak only grows
