"""The memory-capped benchmark (`edgemoe bench --max-memory`): real cgroups around real child
processes, the page cache dropped and checked with mincore, the bound's arithmetic, the whole
harness on the demo model, and the one clear line where no cgroup can be made."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from edgemoe.bench.capped import (RUN_NAMES, CappedOptions, CappedResult, ModelReport, bound_tokens_per_s,
                                  check_cgroups, run_capped)
from edgemoe.bench.capped_run import RunMeasure
from edgemoe.bench.cgroup import CgroupError, MemoryCgroup
from edgemoe.bench.pagecache import drop_file_cache, resident_bytes

MIB = 2**20


def _cgroups_or_skip() -> None:
    try:
        check_cgroups()
    except CgroupError as exc:
        pytest.skip(f"no writable memory cgroup on this machine: {exc}")


def _allocate_in_group(name: str, limit_mib: int, alloc_mib: int):
    """A Python child in a fresh group that touches `alloc_mib` MiB (a bytes object of that
    size); returns (the finished child, the group's usage, the removed group)."""
    group = MemoryCgroup.create(f"edgemoe-test-{os.getpid()}-{name}", limit_mib * MIB)
    try:
        code = f"x = b'x' * ({alloc_mib} * 2**20); print(len(x))"
        done = subprocess.run(group.wrap([sys.executable, "-c", code]), capture_output=True, text=True, timeout=60)
        return done, group.usage(), group
    finally:
        group.remove()


def test_cgroup_peak_under_the_cap_and_cleanup():
    _cgroups_or_skip()
    done, usage, group = _allocate_in_group("fits", 256, 64)
    assert done.returncode == 0, done.stderr
    assert usage.oom_kills == 0
    assert 64 * MIB <= usage.peak_bytes <= 256 * MIB
    assert usage.limit_bytes == 256 * MIB
    assert not group.path.exists()


def test_cgroup_oom_kill_is_reported():
    _cgroups_or_skip()
    done, usage, group = _allocate_in_group("oom", 48, 256)
    assert done.returncode == -9  # SIGKILL from the kernel's OOM killer
    assert usage.oom_kills >= 1
    assert usage.peak_bytes <= 48 * MIB
    assert not group.path.exists()


def test_no_cgroup_folder_is_one_clear_error(tmp_path):
    with pytest.raises(CgroupError, match="not a cgroup folder"):
        MemoryCgroup.create("x", 64 * MIB, root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-made


def test_not_root_cannot_make_a_cgroup():
    """A process without root's rights (root dropped to `nobody` in a forked child) gets the
    'cannot make' error, not a crash."""
    _cgroups_or_skip()
    if os.geteuid() != 0:
        with pytest.raises(CgroupError):
            check_cgroups()
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_check_as_nobody, args=(child,))
    proc.start()
    message = parent.recv()
    proc.join(10)
    assert message.startswith("CgroupError: cannot make a memory cgroup"), message


def _check_as_nobody(conn) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        check_cgroups()
        conn.send("made a cgroup as nobody")
    except CgroupError as exc:
        conn.send(f"CgroupError: {exc}")
    except Exception as exc:  # anything else is the bug this test looks for
        conn.send(f"{type(exc).__name__}: {exc}")


def test_bench_without_a_cgroup_exits_2_and_runs_nothing(tmp_path, capsys):
    from edgemoe.cli import main
    from edgemoe.demo import demo_gguf

    code = main(["bench", "--max-memory", "1GiB", "--cgroup-root", str(tmp_path), str(demo_gguf())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "cannot cap memory, nothing was run" in err[0] and str(tmp_path) in err[0]
    assert list(tmp_path.iterdir()) == []


def test_sigterm_removes_the_groups_and_the_child(tmp_path):
    """`kill` during a run: the child is killed and its cgroup removed, as with Ctrl-C."""
    _cgroups_or_skip()
    import signal
    import time

    from pathlib import Path

    from edgemoe.demo import demo_gguf

    model = tmp_path / "demo.gguf"
    shutil.copy(demo_gguf(), model)
    bench = subprocess.Popen([sys.executable, "-m", "edgemoe.cli", "bench", "--max-memory", "1GiB", str(model),
                              "-n", "64", "--runs", "edgemoe", "--budget", "8MiB", "--no-reference"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    version, parent = check_cgroups().split(" ", 1)  # "v1 /sys/fs/cgroup/memory/..."
    parent, pids = Path(parent), []
    deadline = time.monotonic() + 60
    while not pids and time.monotonic() < deadline:
        groups = list(parent.glob(f"edgemoe-bench-{bench.pid}-*"))
        pids = MemoryCgroup(groups[0], int(version[1:]), None).pids() if groups else []
        time.sleep(0.05)
    assert pids, "no child ever ran in the run's cgroup"
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(30) == 130
    assert not list(parent.glob(f"edgemoe-bench-{bench.pid}-*"))
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_page_cache_drop_is_verified_by_mincore(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * MIB))
    with open(path, "rb") as f:
        f.read()
    assert resident_bytes(path) == 8 * MIB
    assert drop_file_cache(path) == 0
    assert resident_bytes(path) == 0
    # pages a mapping holds are not dropped, and the count says so rather than pretending
    import mmap
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        _ = sum(m[i] for i in range(0, MIB, mmap.PAGESIZE))
        assert drop_file_cache(path) >= MIB
    assert resident_bytes(path, offset=MIB, length=MIB) == 0


def test_probe_reads_the_file_with_parallel_direct_streams(tmp_path, monkeypatch):
    """4 streams of 8 MiB O_DIRECT blocks: every block of the range read once, bypassing the cache."""
    from edgemoe.tune import machine

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(40 * MIB))
    drop_file_cache(path)
    offsets, real = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: (offsets.append(off), real(fd, bufs, off))[1])
    bps, method = machine.read_cold_bps(path, 0, 40 * MIB, max_s=30.0, streams=4, block_bytes=8 * MIB)
    assert method == "O_DIRECT" and bps > 0
    assert sorted(offsets) == [i * 8 * MIB for i in range(5)]
    assert resident_bytes(path) == 0  # O_DIRECT left nothing in the page cache


def test_bound_arithmetic():
    # 100 MiB per token at 1 GB/s is 0.1048576 s, plus 50 ms of compute
    assert bound_tokens_per_s(100 * MIB, 1e9, 0.05) == pytest.approx(1 / (0.1048576 + 0.05))
    assert bound_tokens_per_s(0, 1e9, 0.25) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        bound_tokens_per_s(MIB, 0.0, 0.1)


def _result(name: str, status: str, decode_s: float = 1.0, read: int = 0, tokens=(1, 2, 3)) -> CappedResult:
    m = RunMeasure(8, 10, 0, 0.1, 1.0, decode_s, 0, 0, read, tokens=list(tokens)) if status == "ok" else None
    return CappedResult(name, name, status, measure=m)


def test_ratio_is_against_the_best_plain_llama_that_ran():
    ref = _result("reference", "ok", decode_s=0.5)  # 20 tok/s warm: 50 ms compute per token
    report = ModelReport("m", 1, 2e9, "O_DIRECT", "v1 x", reference=ref)
    report.results = [_result("llama", "oom-killed"), _result("llama-norepack", "ok", decode_s=10.0),
                      _result("llama-lazy", "ok", decode_s=5.0),
                      _result("edgemoe", "ok", decode_s=2.0, read=10 * 10**9, tokens=(1, 2, 4))]
    assert report.best_plain_llama().name == "llama-lazy"
    assert report.ratio(report.results[3]) == pytest.approx(2.5)   # 5 vs 2 tok/s
    assert report.ratio(report.results[0]) is None                  # a killed run has no speed
    assert report.compute_s_per_token == pytest.approx(0.05)
    # 1 GB per token at 2 GB/s + 50 ms
    assert report.bound_tps(report.results[3]) == pytest.approx(1 / 0.55)
    report.probe_after_bps = 4e9  # the disk was faster after the runs: the bound takes the faster probe
    assert report.disk_bps == 4e9 and report.bound_tps(report.results[3]) == pytest.approx(1 / 0.30)
    report.probe_after_bps = 1e9
    assert report.bound_tps(report.results[3]) == pytest.approx(1 / 0.55)
    assert report.same_tokens(report.results[2]) is True and report.same_tokens(report.results[3]) is False
    assert report.same_tokens(report.results[1]) is None  # the reference itself


def test_steal_is_read_from_proc_stat_and_shared_over_the_cpus(monkeypatch):
    import os

    from edgemoe.bench import capped_run
    from edgemoe.bench.capped_report import steal_share

    first = capped_run.steal_seconds()
    assert 0 <= first <= capped_run.steal_seconds()
    r = _result("edgemoe", "ok", decode_s=2.0)
    r = CappedResult(r.name, r.label, r.status, measure=RunMeasure(**{**r.measure.__dict__, "steal_s": 1.0}))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert steal_share(r) == pytest.approx(25.0)  # 1 s of 2 s x 2 CPUs


def test_capped_bench_end_to_end_on_the_demo(tmp_path):
    """Every configuration, each in its own cgroup with a generous cap, through the CLI."""
    _cgroups_or_skip()
    from edgemoe.cli import main
    from edgemoe.demo import demo_gguf

    model = tmp_path / "demo.gguf"  # a private copy: no other process maps it, so 'cold' is exact
    shutil.copy(demo_gguf(), model)
    out = tmp_path / "capped.json"
    assert main(["bench", "--max-memory", "2GiB", str(model), "-n", "3", "--prompt-tokens", "8", "--threads", "1",
                 "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())
    assert report["probe_method"] == "O_DIRECT" and report["probe_bps"] > 0 and report["probe_after_bps"] > 0
    assert report["disk_bps"] == max(report["probe_bps"], report["probe_after_bps"])
    ref = report["reference"]
    assert ref["status"] == "ok" and report["compute_s_per_token"] > 0
    assert ref["measure"]["start_resident_bytes"] == model.stat().st_size  # warm: every page cached
    names = [r["name"] for r in report["results"]]
    assert all(r["measure"]["steal_s"] >= 0 for r in report["results"] if r["status"] == "ok")
    assert names == list(RUN_NAMES)  # plain llama.cpp x3, the engine, the budgeted llama.cpp mode
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["cold_resident_bytes"] == r["measure"]["start_resident_bytes"] == 0, r  # mincore: none cached
        assert 0 < r["usage"]["peak_bytes"] <= 2 * 2**30 and r["usage"]["oom_kills"] == 0
        assert r["measure"]["decode_tokens"] == 3 and r["decode_tps"] > 0 and r["bound_tps"] > 0
    assert max(r["ratio_vs_best_llama"] for r in report["results"][:3]) == pytest.approx(1.0)
    assert report["results"][4]["same_tokens_as_llama"] is True  # llama.cpp's kernels under our cache: exact
    for managed in report["results"][3:]:
        m = managed["measure"]
        assert managed["budget_bytes"] > 0 and m["hits"] + m["misses"] > 0, managed
        assert m["loader_bytes"] >= 0 and m["loader_busy_s"] >= 0


def test_an_oom_killed_backend_is_reported_as_killed(tmp_path):
    """The engine (torch alone is ~150 MiB) under a 120 MiB cap is killed; plain llama.cpp on the
    30 MB demo runs; the harness reports both and goes on."""
    _cgroups_or_skip()
    from edgemoe.commands.measure import _bench_prompt
    from edgemoe.demo import demo_gguf

    model = tmp_path / "demo.gguf"
    shutil.copy(demo_gguf(), model)
    opts = CappedOptions(120 * MIB, _bench_prompt(8), n_tokens=2, n_threads=1, n_ctx=96,
                         runs=("llama-norepack", "edgemoe"), budget_bytes=4 * MIB, reference=False)
    (report,) = run_capped([model], opts)
    plain, engine = report.results
    assert plain.status == "ok" and plain.decode_tps > 0
    assert engine.status == "oom-killed" and engine.usage.oom_kills >= 1
    assert report.ratio(engine) is None and report.bound_tps(engine) is None


def test_bench_predictor_reaches_every_managed_run(tmp_path, monkeypatch, capsys):
    """bench --max-memory --predictor NAME: the managed runs prefetch with it (their RunSpecs and
    labels say which); plain llama.cpp runs take none; without --max-memory it is refused."""
    import edgemoe.bench.capped as capped
    from edgemoe.cli import main
    from edgemoe.demo import demo_gguf

    seen = []
    monkeypatch.setattr(capped, "check_cgroups", lambda root: None)
    monkeypatch.setattr(capped, "run_capped", lambda models, opts, **kw: seen.append(opts) or [])
    assert main(["bench", "--max-memory", "2GiB", "--predictor", "router", str(demo_gguf())]) == 0
    (opts,) = seen
    assert opts.prefetch and opts.predictor == "router" and opts.predictor_path is None
    specs = {s.backend: s for s in capped.configurations(demo_gguf(), opts)}
    for name in ("edgemoe", "llama-budget"):
        assert specs[name].prefetch and specs[name].predictor == "router" and "+prefetch(router)" in specs[name].label
    assert not specs["llama"].prefetch
    assert main(["bench", "--predictor", "router", str(demo_gguf())]) == 2
    assert "applies to the managed runs of --max-memory" in capsys.readouterr().err
