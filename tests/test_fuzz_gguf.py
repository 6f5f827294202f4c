"""Fuzzing the GGUF reader, the dense-shape checks and the extended layout: mutated real files
(header, counts, kv types and values, string and array lengths, tensor dims/types/offsets, the
alignment key, truncation, byte flips, the `edgemoe.` expert tables) go through the engine's own
open path (GGUFFile, find_experts, Engine, one generated token at a tight budget, so dense and
expert bytes reach ggml). Each case either runs or raises ModelFileError naming the file; anything
else is a bug.

Sources (SOURCES): the tiny checkpoint of every architecture in q8_0 (stock layout), per-expert
mixed precision (extended layout v1) and compressed files (pruned layers, low-rank experts:
extended layout v2). In-process cases use hypothesis (derandomized, fixed budget); a batch over
every source also runs in a child process, because native code would abort or segfault rather
than raise. CI runs a few hundred cases in all. Long run (docs/RELIABILITY.md):
`python tests/test_fuzz_gguf.py --tiny DIR --cases N --seed S --keep-going` (N cases per source;
exit 0: every case ran or gave ModelFileError; a crash, or a hang past --case-timeout, leaves the
case being run in DIR/case.txt),
or `python tests/test_fuzz_gguf.py FILE.gguf ... --cases N` for files of your own.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CASES = int(os.environ.get("EDGEMOE_FUZZ_CASES", "20"))  # per source; CI-sized (9 sources)
CHILD_CASES = int(os.environ.get("EDGEMOE_FUZZ_CHILD_CASES", "12"))
PROMPT = "def f(x):"
# name -> how tests/tiny_files.py makes it: every architecture stock, two mixed, two compressed
SOURCES = {**{arch: ("stock", arch) for arch in ("mixtral", "qwen2moe", "deepseek2", "olmoe", "qwen3moe")},
           "mixed-mixtral": ("mixed", "mixtral"), "mixed-deepseek2": ("mixed", "deepseek2"),
           "compressed-qwen2moe": ("compressed", "qwen2moe"), "compressed-deepseek2": ("compressed", "deepseek2")}
# interesting integers for a field of a given width: boundaries, sign flips, near-size values
_EDGES = [0, 1, 2, 3, 7, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1,
          2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
_FLOATS = [0.0, -0.0, -1.0, 0.5, 2.0, 1e-30, 1e30, float("inf"), float("-inf"), float("nan")]


@dataclass(frozen=True)
class Slot:
    """One integer or byte run in the file's metadata: where, how wide, what it is."""
    offset: int
    width: int
    what: str
    integer: bool
    real: bool = False  # a float32/float64 value


class Chooser:
    """Random choices from either `random.Random` or hypothesis' `data.draw` (for shrinking)."""

    def __init__(self, rng: random.Random | None = None, draw=None):
        self.rng, self.draw = rng, draw

    def int(self, lo: int, hi: int) -> int:
        if self.draw is not None:
            from hypothesis import strategies as st
            return self.draw(st.integers(lo, hi))
        return self.rng.randint(lo, hi)

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]


def _offset(reader, part: np.ndarray) -> int:
    return part.ctypes.data - reader.data.ctypes.data


def metadata_slots(path: Path) -> tuple[list[Slot], int]:
    """Every field part of the header, kv pairs and tensor infos, and where the data begins."""
    import gguf
    reader = gguf.GGUFReader(path, "r")
    slots = []
    for name, field in reader.fields.items():
        for i, part in enumerate(field.parts):
            if not part.nbytes:
                continue
            integer = part.dtype.kind in "iu" and part.size == 1
            what = f"kv {name} part {i}" if not name.startswith("GGUF.") else name
            slots.append(Slot(_offset(reader, part), part.nbytes, what, integer, part.dtype.kind == "f" and part.size == 1))
    for t in reader.tensors:
        labels = ["name length", "name", "n_dims", "dims", "type", "offset"]
        for label, part in zip(labels, t.field.parts):
            if label == "dims":
                for d in range(part.size):
                    slots.append(Slot(_offset(reader, part) + 8 * d, 8, f"tensor {t.name} dim {d}", True))
            else:
                slots.append(Slot(_offset(reader, part), part.nbytes, f"tensor {t.name} {label}",
                                  label != "name"))
    data_start = int(reader.data_offset)
    del reader
    return slots, data_start


def _set_int(buf: bytearray, slot: Slot, value: int) -> None:
    value &= (1 << (8 * slot.width)) - 1
    buf[slot.offset:slot.offset + slot.width] = value.to_bytes(slot.width, "little")


def _interesting(c: Chooser, old: int, width: int) -> int:
    kind = c.int(0, 3)
    if kind == 0:
        return c.pick(_EDGES)
    if kind == 1:
        return old + c.int(-3, 3)
    if kind == 2:
        return old * c.pick([2, 16, 2**20]) if c.int(0, 1) else old // c.pick([2, 3, 64])
    return c.int(0, 2**(8 * width) - 1)


def mutate(data: bytes, slots: list[Slot], data_start: int, c: Chooser) -> tuple[bytes, list[str]]:
    """1-3 mutations of `data`; returns the mutated bytes and what was done."""
    buf, done = bytearray(data), []
    ints = [s for s in slots if s.integer]
    edgemoe = [s for s in ints if "kv edgemoe." in s.what]
    # the architecture's hyper-parameters (head counts, RoPE dims, ranks, widths): a few dozen of the
    # thousands of integers (most are vocabulary items), so sampled on their own like edgemoe's tables
    hparams = [s for s in slots if (s.integer or s.real) and s.what.startswith("kv ")
               and s.what.split()[1].split(".")[0] not in ("general", "tokenizer", "edgemoe")]
    tensor = [s for s in ints if s.what.startswith("tensor ")]
    for _ in range(c.int(1, 3)):
        kind = c.pick(["header", "kv", "tensor", "truncate", "flip", "alignment", "edgemoe", "string", "hparam"])
        if kind == "header":
            slot = c.pick([s for s in slots if s.what.startswith("GGUF.")] + [Slot(0, 4, "magic", True)])
            value = _interesting(c, int.from_bytes(buf[slot.offset:slot.offset + slot.width], "little"), slot.width)
            _set_int(buf, slot, value)
            done.append(f"{slot.what} = {value}")
        elif kind in ("kv", "tensor", "edgemoe", "hparam"):
            pool = {"kv": [s for s in ints if s.what.startswith("kv ")], "tensor": tensor, "edgemoe": edgemoe,
                    "hparam": hparams}[kind]
            if not pool:
                continue
            slot = c.pick(pool)
            if slot.offset + slot.width > len(buf):
                continue
            if slot.real:  # epsilons, RoPE bases and scales, router scales
                value = c.pick(_FLOATS)
                buf[slot.offset:slot.offset + slot.width] = np.array([value], dtype=f"<f{slot.width}").tobytes()
                done.append(f"{slot.what} = {value}")
                continue
            value = _interesting(c, int.from_bytes(buf[slot.offset:slot.offset + slot.width], "little"), slot.width)
            _set_int(buf, slot, value)
            done.append(f"{slot.what} = {value}")
        elif kind == "truncate":
            if not buf:
                continue
            end = c.int(0, data_start + 64) if c.int(0, 1) else c.int(0, len(buf) - 1)
            del buf[end:]
            done.append(f"truncate at {end}")
        elif kind == "flip":
            for _ in range(c.int(1, 8)):
                at = c.int(0, min(data_start, len(buf)) - 1) if buf else 0
                if at < len(buf):
                    value = c.int(0, 255)
                    buf[at] = value
                    done.append(f"byte {at} = {value}")
        elif kind == "alignment":
            # general.file_type (u32) has the same key length as general.alignment: rename it
            slot = next((s for s in slots if s.what == "kv general.file_type part 1"), None)
            value_slot = next((s for s in slots if s.what == "kv general.file_type part 3"), None)
            if slot and value_slot and slot.width == len(b"general.alignment") and value_slot.offset < len(buf):
                buf[slot.offset:slot.offset + slot.width] = b"general.alignment"
                value = c.pick([0, 1, 3, 8, 16, 31, 33, 64, 4096, 2**31, 2**32 - 1])
                _set_int(buf, value_slot, value)
                done.append(f"general.alignment = {value}")
        else:  # string bytes of a key or a value: random text, same length
            pool = [s for s in slots if not s.integer and s.offset + s.width <= len(buf)]
            if pool:
                slot = c.pick(pool)
                at = slot.offset + c.int(0, slot.width - 1)
                value = c.pick([0, 0x80, 0xff, ord("."), ord("x")])
                buf[at] = value
                done.append(f"{slot.what} byte {at - slot.offset} = {value}")
    return bytes(buf), done


def open_and_run(path: Path) -> str:
    """The engine's open path plus one token at a quarter of the expert bytes. Returns "ok" or
    "ModelFileError"; any other exception propagates (a bug)."""
    from edgemoe.engine import Engine, EngineConfig
    from edgemoe.expert_store import find_experts
    from edgemoe.gguf_file import GGUFFile, ModelFileError

    try:
        specs = find_experts(GGUFFile(path))
        sizes = [s.alloc_bytes for s in specs.values()] or [0]
        budget = max(sum(sizes) // 4, max(sizes))
        engine = Engine(path, EngineConfig(budget_bytes=budget, n_ctx=32, n_threads=1))
        try:
            for _ in engine.stream_generate(PROMPT, max_tokens=1):
                pass
        finally:
            engine.close()
    except ModelFileError as exc:
        if path.name not in str(exc):
            raise AssertionError(f"error does not name the file: {exc}") from exc
        return "ModelFileError"
    return "ok"


def run_cases(source: Path, work: Path, n: int, seed: int, log: Path | None = None,
              keep_going: bool = False, case_timeout_s: float | None = None) -> Counter:
    """`n` seeded cases (random.Random, no hypothesis) on copies of `source` under `work`. A case
    that runs longer than case_timeout_s (a hang inside native code, which no exception can
    interrupt) prints every thread's stack and ends the process with exit 1."""
    import faulthandler

    data = source.read_bytes()
    slots, data_start = metadata_slots(source)
    outcomes: Counter = Counter()
    rng = random.Random(seed)
    target = work / f"fuzz-{source.stem}.gguf"
    for i in range(n):
        mutated, done = mutate(data, slots, data_start, Chooser(rng=rng))
        target.write_bytes(mutated)
        if log is not None:
            log.write_text(f"case {i} seed {seed}: {'; '.join(done)}\n")
        if case_timeout_s:
            faulthandler.dump_traceback_later(case_timeout_s, exit=True)
        try:
            outcomes[open_and_run(target)] += 1
        except Exception as exc:
            if keep_going:
                outcomes[f"BUG {type(exc).__name__}"] += 1
                print(f"case {i} ({'; '.join(done)}): {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            raise AssertionError(f"case {i} ({'; '.join(done)}): {type(exc).__name__}: {exc}") from exc
        finally:
            faulthandler.cancel_dump_traceback_later()
    return outcomes


def build_sources(root: Path) -> dict[str, Path]:
    """SOURCES' files under `root` (reused when already there)."""
    import tiny_files

    made = {"stock": lambda arch: tiny_files.stock(arch, "q8_0", root), "mixed": lambda arch: tiny_files.mixed(arch, root),
            "compressed": lambda arch: tiny_files.compressed(arch, root)}
    return {name: made[kind](arch) for name, (kind, arch) in SOURCES.items()}


# ---- pytest -------------------------------------------------------------------------------
try:
    import pytest
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the __main__ runner needs neither
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.usefixtures("one_torch_thread")
    FUZZ_SETTINGS = settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
                             suppress_health_check=list(HealthCheck), print_blob=True)
    TALLY: dict[str, Counter] = {}

    @pytest.fixture(scope="module")
    def sources(tmp_path_factory):
        return build_sources(tmp_path_factory.mktemp("fuzz"))

    @pytest.mark.slow
    @pytest.mark.parametrize("name", list(SOURCES))
    def test_mutated_files_run_or_raise_model_file_error(sources, name, tmp_path):
        source = sources[name]
        data = source.read_bytes()
        slots, data_start = metadata_slots(source)
        tally = TALLY.setdefault(name, Counter())
        target = tmp_path / "fuzz.gguf"

        @FUZZ_SETTINGS
        @given(st.data())
        def case(d):
            mutated, done = mutate(data, slots, data_start, Chooser(draw=d.draw))
            target.write_bytes(mutated)
            d.draw(st.just("; ".join(done)), label="mutations")
            tally[open_and_run(target)] += 1

        case()
        print(f"{name}: {sum(tally.values())} cases: {dict(tally)}")
        assert sum(tally.values()) >= CASES
        assert tally["ModelFileError"] > 0  # the mutations break files (and, over a long run, spare some)

    @pytest.mark.slow
    def test_child_process_survives_a_batch_of_every_source(sources, tmp_path):
        """Native code would abort or segfault here rather than raise: the exit code tells."""
        done = subprocess.run([sys.executable, __file__, *map(str, sources.values()), "--cases", str(CHILD_CASES),
                               "--seed", "7", "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
        case = (tmp_path / "case.txt").read_text() if (tmp_path / "case.txt").exists() else "?"
        assert done.returncode == 0, f"exit {done.returncode} during {case}\n{done.stderr[-3000:]}"
        lines = [line for line in done.stdout.splitlines() if " cases: " in line]
        assert len(lines) == len(sources), done.stdout
        print("\n".join(lines))

    def test_truncation_at_every_region_is_a_clear_error(sources, tmp_path):
        """Deterministic companions to the fuzzer: a cut in the header, the kv pairs, the tensor
        infos and the tensor data each name the file and say what to do."""
        from edgemoe.gguf_file import GGUFFile, ModelFileError
        source = sources["compressed-deepseek2"]
        data = source.read_bytes()
        slots, data_start = metadata_slots(source)
        cuts = [0, 3, 10, slots[5].offset + 1, next(s.offset for s in slots if s.what.startswith("tensor")) + 2,
                data_start - 1, data_start + 100, len(data) - 1]
        for cut in cuts:
            target = tmp_path / f"cut-{cut}.gguf"
            target.write_bytes(data[:cut])
            with pytest.raises(ModelFileError, match=target.name):
                GGUFFile(target)


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="seeded GGUF fuzz batches (see module docstring)")
    parser.add_argument("source", type=Path, nargs="*", help="GGUF files to mutate")
    parser.add_argument("--tiny", type=Path, default=None, metavar="DIR",
                        help="also every file of SOURCES, built from the tiny checkpoints into DIR (reused)")
    parser.add_argument("--cases", type=int, default=1000, help="cases per source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--keep-going", action="store_true", help="report every failing case, exit 1 at the end")
    parser.add_argument("--case-timeout", type=float, default=120.0, metavar="S",
                        help="a case running longer (a hang in native code) dumps the stacks and exits 1")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    sources = list(args.source)
    if args.tiny is not None:
        args.tiny.mkdir(parents=True, exist_ok=True)
        sources += list(build_sources(args.tiny).values())
    if not sources:
        parser.error("give GGUF files or --tiny DIR")
    bugs = False
    for source in sources:
        work = args.work or source.parent
        start = time.perf_counter()
        result = run_cases(source, work, args.cases, args.seed, log=work / "case.txt", keep_going=args.keep_going,
                           case_timeout_s=args.case_timeout)
        print(f"{source.name}: {sum(result.values())} cases: {dict(result)} in {time.perf_counter() - start:.0f}s",
              flush=True)
        bugs = bugs or any(k.startswith("BUG") for k in result)
    sys.exit(1 if bugs else 0)
