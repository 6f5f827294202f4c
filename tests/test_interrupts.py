"""`edgemoe convert`, `convert --mixed` and `compress` killed by SIGINT or SIGTERM at seeded random
moments: no partial or temporary file is left (or, when the signal came after the rename, the
complete file), and re-running after the interruptions writes exactly the bytes of an
uninterrupted run."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEED = 8
JOBS = {
    "convert": ["--type", "q8_0"],
    "mixed": ["--mixed", "--avg-bits", "4", "--calibration-tokens", "256"],
    "compress": ["--population", "8", "--generations", "3", "--calib-tokens", "256", "--kt-tokens", "128",
                 "--threads", "1"],
}
POINTS = {"convert": 4, "mixed": 3, "compress": 3}  # signals per job (half SIGINT, half SIGTERM)


def command(job: str, ckpt: Path, out: Path) -> list[str]:
    sub = "compress" if job == "compress" else "convert"
    return [sys.executable, "-m", "edgemoe.cli", sub, str(ckpt), "-o", str(out), *JOBS[job]]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "out.gguf")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    """job -> (bytes of an uninterrupted run, its wall time)."""
    ckpt = tiny_checkpoint("mixtral")
    cache = {}

    def get(job: str):
        if job not in cache:
            out = tmp_path_factory.mktemp(f"ref-{job}") / "out.gguf"
            t0 = time.monotonic()
            done = subprocess.run(command(job, ckpt, out), capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            cache[job] = out.read_bytes(), time.monotonic() - t0
        return cache[job]
    return ckpt, get


def interrupt(job: str, ckpt: Path, expected: bytes, folder: Path, sig: int, delay_s: float) -> str:
    out = folder / "out.gguf"
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # inherited SIG_IGN: give the child the default so Ctrl-C reaches it as in a terminal
    proc = subprocess.Popen(command(job, ckpt, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay_s)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert leftovers(folder) == [], f"{job}: {signal.Signals(sig).name} at {delay_s:.2f}s left {leftovers(folder)}"
    if proc.returncode == 0:
        outcome = "finished first"
    else:
        # 130: the CLI caught KeyboardInterrupt (SIGINT, or SIGTERM turned into it); -2/-15: the
        # signal came during start-up (nothing written yet) or interpreter shutdown (file complete)
        assert proc.returncode in (130, -signal.SIGINT, -signal.SIGTERM), err[-2000:]
        assert "Traceback" not in err or proc.returncode != 130
        outcome = f"interrupted (exit {proc.returncode})"
    if out.exists():  # only once the complete file was renamed into place
        assert out.read_bytes() == expected
        out.unlink()
    return outcome


@pytest.mark.slow
@pytest.mark.parametrize("job", ["convert", "mixed", "compress"])
def test_interrupted_at_random_points_leaves_nothing_and_reruns_exactly(reference, job, tmp_path):
    """Several interruptions in one folder, then one re-run there: it finishes, byte-identical."""
    ckpt, get = reference
    expected, wall_s = get(job)
    rng = random.Random(f"{SEED}-{job}")
    outcomes = []
    for i in range(POINTS[job]):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        # start-up and every stage; the last point near the end (before or just after the rename)
        delay_s = rng.uniform(0.3, 0.8 * wall_s) if i < POINTS[job] - 1 else rng.uniform(0.9, 1.05) * wall_s
        outcomes.append((signal.Signals(sig).name, round(delay_s, 2),
                         interrupt(job, ckpt, expected, tmp_path, sig, delay_s)))
    print(job, f"uninterrupted {wall_s:.1f}s", outcomes)
    assert any(o[2].startswith("interrupted") for o in outcomes)
    out = tmp_path / "out.gguf"
    done = subprocess.run(command(job, ckpt, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes() == expected, f"{job}: the re-run differs from an uninterrupted run"
    assert leftovers(tmp_path) == []
