"""ExpertCache: quantized expert bytes under a hard byte budget.

Invariant (asserted by tests on every step): resident bytes + bytes of loads in flight never
exceed `budget_bytes`. A demand miss evicts by policy until the expert fits; a prefetch only
uses room it can make without touching pinned experts or other unused prefetches, and gives
up otherwise. The bookkeeping is `Residency` (shared with the trace simulator); this class adds
the locking and the reads.

Dual precision (`low` copies, edgemoe/dual.py): `acquire_for` serves a miss from the expert's
resident low-bit copy when its gate weight is at or below `load_above`; a miss above it loads the
full copy and waits. With `background_load` a thread also loads the full copy of a low-served
miss under the same budget. The
loader takes the newest request first and drops requests older than `stale_after` demand
accesses: a load that finishes after its expert's moment only evicts something useful. Without
`background_load` (the default) a low-served miss loads nothing: the low copy serves instead of
the full one, and only misses above `load_above` (and prefetches) bring full copies in. The
low copies are outside `budget_bytes` (reported as `low_resident_bytes`).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

from edgemoe.dual import LowCopies
from edgemoe.events import CacheStats
from edgemoe.expert_loader import ExpertLoader, ReadCancelled, spec_ranges
from edgemoe.expert_store import ExpertSpec, ResidentExpert, expert_buffer
from edgemoe.gguf_file import ExpertReadError, ModelFileChanged, ModelFileError
from edgemoe.policies import Key, Policy
from edgemoe.residency import BudgetError, Residency  # noqa: F401  (BudgetError re-exported)


def _check_shapes(path, specs: dict[Key, ExpertSpec]) -> None:
    """A full-rank expert is gate, up [F, D] and down [D, F]: a file that says otherwise would fail
    (or worse) in the expert graph; say so before any token runs."""
    for key, spec in specs.items():
        m = {p.role: p for p in spec.parts}
        if set(m) != {"gate", "up", "down"}:
            continue  # low-rank factors: edgemoe.expert_store checks those shapes
        g, u, d = m["gate"], m["up"], m["down"]
        if not (g.rows == u.rows == d.cols and g.cols == u.cols == d.rows):
            raise ModelFileError(f"{os.fspath(path)}: expert {key} has gate {g.rows}x{g.cols}, up {u.rows}x{u.cols}, "
                                 f"down {d.rows}x{d.cols}; they do not form one FFN, the file is corrupt")


HALT_WAIT_S = 5.0  # after a failed demand read, how long to wait for background loads in flight


class _Specs(dict):
    """key -> ExpertSpec; routing to an expert the file lacks is a ModelFileError naming the file."""

    def __init__(self, path, specs: dict[Key, ExpertSpec]):
        super().__init__(specs)
        self.path = os.fspath(path)

    def __missing__(self, key: Key):
        raise ModelFileError(f"{self.path}: the router of layer {key[0]} chose expert {key[1]}, which the file "
                             "does not hold; the file is incomplete or corrupt, re-create it")


class ExpertCache:
    def __init__(self, path: str | os.PathLike, specs: dict[Key, ExpertSpec], budget_bytes: int, policy: Policy,
                 n_layers: int, low: LowCopies | None = None, load_above: float = 0.5, stale_after: int = 64,
                 background_load: bool = False, sizes: dict[Key, int] | None = None,
                 loader: ExpertLoader | None = None):
        """sizes: what the budget counts per expert (default each spec's `alloc_bytes`); a cache
        that keeps experts elsewhere (edgemoe/llama_budget.py) counts its own footprint.
        loader: the reads (default a new ExpertLoader of `path`, closed with the cache)."""
        self.specs, self.n_layers = _Specs(path, specs), n_layers
        _check_shapes(path, specs)
        self.low, self.load_above, self.stale_after = low, load_above, stale_after
        self.background_load = background_load  # False: a low-served miss loads nothing (low "instead of" full)
        sizes = sizes if sizes is not None else {k: s.alloc_bytes for k, s in specs.items()}
        self.state = Residency(sizes, budget_bytes, policy)
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.file_size, self._file_mtime_ns = st.st_size, st.st_mtime_ns
        self.file_changed: str | None = None  # set once the file is seen truncated or rewritten: sticky
        self.loader = loader or ExpertLoader(self.path)  # parallel chunked reads (edgemoe/expert_loader.py)
        self.cond = threading.Condition()
        self.experts: dict[Key, ResidentExpert] = {}
        self.loading: set[Key] = set()
        self.halted = False  # a demand read failed: no background loads until the next demand access
        self._prefetching: dict[Key, threading.Event] = {}  # prefetch reads in flight -> their cancel
        self._loads: queue.Queue | None = None
        if low is not None:
            self._loads = queue.LifoQueue()  # (clock at request, key); None stops the loader
            self._loader = threading.Thread(target=self._load_in_background, name="edgemoe-dual-load", daemon=True)
            self._loader.start()

    @property
    def budget_bytes(self) -> int:
        return self.state.budget_bytes

    @property
    def resident_bytes(self) -> int:
        return self.state.resident_bytes

    @property
    def in_flight_bytes(self) -> int:
        return self.state.in_flight_bytes

    @property
    def resident(self) -> set[Key]:
        return set(self.state.resident)

    def _drop_evicted(self) -> None:
        for key in self.state.evicted:
            self.experts.pop(key).close()
        self.state.evicted.clear()

    # ---- demand path --------------------------------------------------------------------
    def acquire(self, key: Key) -> ResidentExpert:
        """The resident expert for `key`, loading it on a miss; pinned until `release`."""
        with self.cond:
            self.state.touch(key)
        return self._acquire_touched(key)

    def acquire_for(self, key: Key, gate: float, n_slots: int) -> tuple[ResidentExpert, bool]:
        """(expert, pinned) for `n_slots` token slots whose largest gate weight is `gate`. Without
        low copies this is `acquire`. With them: a hit, or a miss above `load_above`, returns the
        full-precision copy (pinned: `release` it); any other miss returns the low copy at once
        (not pinned) and queues the full-precision load."""
        s = self.state
        with self.cond:
            s.c.token_slots += n_slots
            if self.low is None:
                s.touch(key, n_slots)
            elif key in self.low.exact:  # the low copy is the file's bytes: a hit that never loads
                s.c.hits += 1
                return self.low.experts[key], False
            else:
                s.touch(key, n_slots)
                if key not in s.resident and gate <= self.load_above:
                    s.c.misses += 1
                    s.c.low_served += 1
                    s.c.low_token_slots += n_slots
                    if self.background_load and key not in self.loading:
                        self._loads.put((s.clock, key))
                    return self.low.experts[key], False
        return self._acquire_touched(key), True

    def acquire_many(self, keys: list[Key], n_slots: list[int] | None = None) -> list[ResidentExpert]:
        """`acquire` of each of `keys` (distinct, one layer's step), with the misses' reads in
        flight together (small experts need the queue depth); each returned expert is pinned until
        `release`. All keys are touched first (with the token slots each serves, `n_slots`), then
        every resident one is a hit and pinned before any miss makes room: routing chose them
        together, so a miss must not evict an expert the same step is about to use
        (edgemoe.simulate replays exactly this). The keys must fit the budget together (else
        BudgetError: nothing is pinned or loaded)."""
        s = self.state
        need = sum(s.sizes[k] for k in keys)
        if need > s.budget_bytes:
            raise BudgetError(f"{len(keys)} experts of {need / 2**20:.2f} MiB do not fit the expert budget of "
                              f"{s.budget_bytes / 2**20:.2f} MiB together")
        misses: list[Key] = []
        t0 = 0.0
        with self.cond:
            s.c.token_slots += sum(n_slots or ())
            s.touch_step(keys, n_slots or [1] * len(keys))
            held = [key for key in keys if self._hit_if_resident(key)]
            for key in keys:
                if key in held:
                    continue
                started = self._hit_or_begin(key)  # the rest are unpinned or prefetches in flight: room comes
                if started is not None:
                    t0 = t0 or started
                    misses.append(key)
        try:
            loaded = self._read_many(misses, demand=True) if misses else []
        except BaseException:
            for key in keys:
                if key not in misses:
                    self.release(key)
            raise
        with self.cond:
            for key, expert in zip(misses, loaded):
                self._insert(key, expert, prefetched=False)
                s.pins[key] += 1
            if misses:
                s.c.stall_s += time.perf_counter() - t0
            return [self.experts[k] for k in keys]

    def _hit_if_resident(self, key: Key) -> bool:
        """Under the lock: a touched key that is resident (or being prefetched) is a hit, pinned."""
        s = self.state
        if key in self.loading:  # a prefetch is bringing it in: wait for it
            t0 = time.perf_counter()
            while key in self.loading:
                self.cond.wait()
            s.c.stall_s += time.perf_counter() - t0
        if key not in s.resident:
            return False
        s.hit(key)
        s.pins[key] += 1
        return True

    def _hit_or_begin(self, key: Key) -> float | None:
        """A touched demand access, under the lock: None for a hit (now pinned); for a miss, room
        is made, the load is begun, and the time the miss began is returned."""
        s = self.state
        self.halted = False
        if self._hit_if_resident(key):
            return None
        s.c.misses += 1
        t0 = time.perf_counter()
        while not s.make_room(s.sizes[key]):
            self._drop_evicted()
            self.cond.wait()  # all else pinned or loading: wait for a release
        self._drop_evicted()
        s.begin_load(key)
        self.loading.add(key)
        return t0

    def _acquire_touched(self, key: Key) -> ResidentExpert:
        s = self.state
        with self.cond:
            t0 = self._hit_or_begin(key)
            if t0 is None:
                return self.experts[key]
        expert = self._read(key, demand=True)
        with self.cond:
            self._insert(key, expert, prefetched=False)
            s.c.stall_s += time.perf_counter() - t0
            s.pins[key] += 1
            return expert

    def check_file(self) -> None:
        """Raise ModelFileChanged if the file was truncated or rewritten since it was opened (one
        fstat). The engine calls it before every forward pass: its dense weights are mapped from
        the file, and touching a mapped page past a truncation kills the process (SIGBUS)."""
        if self.file_changed is None and self.fd >= 0:
            st = os.fstat(self.fd)
            if (st.st_size, st.st_mtime_ns) != (self.file_size, self._file_mtime_ns):
                self.file_changed = (f"model file {self.path} changed while running (size {self.file_size} -> "
                                     f"{st.st_size} bytes); open the model again")
        if self.file_changed is not None:
            raise ModelFileChanged(self.file_changed)

    def _read(self, key: Key, demand: bool = False) -> ResidentExpert:
        return self._read_many([key], demand)[0]

    def _read_many(self, keys: list[Key], demand: bool = False) -> list[ResidentExpert]:
        """Load `keys` (begun with `begin_load`); on any failure every one of them is aborted. A
        failed demand read stops background loads and waits for those in flight, so the cache is
        idle when the error reaches the caller (the reply stops; the next one starts clean)."""
        try:
            self.check_file()
            try:
                return self._load(keys)
            except ModelFileError as exc:
                self.check_file()  # a short read: say so if the file changed under us
                raise ModelFileError(f"{self.path}: {exc}") from exc
            except OSError as exc:
                which = f"expert {keys[0]}" if len(keys) == 1 else f"experts {', '.join(map(str, keys))}"
                raise ExpertReadError(f"reading {which} from {self.path} failed: {exc.strerror or exc}; "
                                      "the reply was stopped, try again (check the disk if it repeats)") from exc
        except BaseException:
            with self.cond:
                for key in keys:
                    self.loading.discard(key)
                    self.state.abort_load(key)
                self.cond.notify_all()
                if demand:
                    self.halted = True
                    self.cond.wait_for(lambda: not self.loading, timeout=HALT_WAIT_S)
            raise

    def _load(self, keys: list[Key]) -> list[ResidentExpert]:
        """Read `keys` into fresh buffers, every read in flight together. A subclass that keeps
        experts elsewhere overrides this; what it returns is `close()`d when evicted."""
        specs = [self.specs[k] for k in keys]
        buffers = [expert_buffer(spec) for spec in specs]
        self.loader.read_many([(spec_ranges(spec), buf) for spec, buf in zip(specs, buffers)])
        return [ResidentExpert(spec, buf) for spec, buf in zip(specs, buffers)]

    def release(self, key: Key) -> None:
        self.release_many([key])

    def release_many(self, keys: list[Key]) -> None:
        """`release` of each of `keys`, under one lock."""
        with self.cond:
            pins = self.state.pins
            for key in keys:
                pins[key] -= 1
                if pins[key] <= 0:
                    del pins[key]
            self.cond.notify_all()

    def _insert(self, key: Key, expert: ResidentExpert, prefetched: bool) -> None:
        self.loading.discard(key)
        self.experts[key] = expert
        self.state.finish_load(key, sum(p.nbytes for p in self.specs[key].parts), prefetched)
        self.cond.notify_all()

    # ---- prefetch path ------------------------------------------------------------------
    def prefetch(self, key: Key) -> bool:
        """Load `key` if room can be made without evicting pinned experts or prefetches waiting
        for their layer (`Residency.room_for_prefetch`: stale guesses go first)."""
        s = self.state
        with self.cond:
            if (self.halted or key in s.resident or key in self.loading
                    or (self.low is not None and key in self.low.exact)):
                return False
            room = s.room_for_prefetch(key)
            self._drop_evicted()
            if not room:
                return False
            s.begin_load(key)
            self.loading.add(key)
            s.c.prefetch_issued += 1
            cancel = self._prefetching[key] = threading.Event()
        try:
            with self.loader.background(cancel):  # behind demand reads; `cancel_prefetches` stops it
                expert = self._read(key)
        except (OSError, ModelFileError, ReadCancelled):
            return False  # the demand path will meet the same error and report it
        finally:
            with self.cond:
                self._prefetching.pop(key, None)
        with self.cond:
            self._insert(key, expert, prefetched=True)
        return True

    def cancel_prefetches(self, layer: int, keep: set[Key]) -> int:
        """Layer `layer` has routed: stop prefetches of its experts that it did not choose (their
        unread chunks would delay the demand reads); returns how many were stopped."""
        with self.cond:
            stop = [k for k in self._prefetching if k[0] == layer and k not in keep]
            for k in stop:
                self._prefetching[k].set()
            return len(stop)

    def _load_in_background(self) -> None:
        """Full-precision loads behind low-served misses: evict like a demand miss, but never wait."""
        while True:
            item = self._loads.get()
            try:
                if item is None:
                    return
                requested, key = item
                if self.state.clock - requested <= self.stale_after:
                    self._load_now(key)
            finally:
                self._loads.task_done()

    def _load_now(self, key: Key) -> None:
        s = self.state
        with self.cond:
            if self.halted or key in s.resident or key in self.loading:
                return
            room = s.make_room(s.sizes[key])
            self._drop_evicted()
            if not room:
                return  # everything else is pinned: the next miss tries again
            s.begin_load(key)
            self.loading.add(key)
        try:
            expert = self._read(key)
        except (OSError, ModelFileError):
            return  # a demand miss will meet the same error and report it
        with self.cond:
            self._insert(key, expert, prefetched=False)

    def drain(self) -> None:
        """Wait until queued background loads are done (tests, benchmarks)."""
        if self._loads is not None:
            self._loads.join()

    # ---- everything resident ------------------------------------------------------------
    def preload_all(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Read every expert now, a layer's reads in flight together: the open of a budget that
        holds them all (`Residency.holds_everything`), as llama.cpp loads its weights. No step
        counts these reads, and no token waits on a cold miss (the replay starts the same way).
        `on_progress(done, total)`: expert bytes read so far, after each layer (a slice's 5 GiB
        take ~10 s here)."""
        s = self.state
        total, done = sum(spec.nbytes for key, spec in self.specs.items() if key not in s.resident), 0
        for layer in sorted({key[0] for key in self.specs}):
            keys = sorted(key for key in self.specs if key[0] == layer and key not in s.resident)
            with self.cond:
                for key in keys:
                    s.begin_load(key)  # _read_many aborts these on a failed read
            experts = self._read_many(keys)
            with self.cond:
                for key, expert in zip(keys, experts):
                    s.abort_load(key)
                    s.preload(key)
                    self.experts[key] = expert
            done += sum(self.specs[key].nbytes for key in keys)
            if on_progress is not None:
                on_progress(done, total)

    def hold_all(self) -> bool:
        """Pin every expert at once when every one is resident within the budget (a whole-token
        graph then computes over them without asking, edgemoe/token_graph.py); False otherwise.
        Dual precision never holds: its misses are served by low copies layer by layer."""
        s = self.state
        with self.cond:
            if self.low is not None or self.loading or len(s.resident) < len(s.sizes) or s.used() > s.budget_bytes:
                return False
            s.all_pinned += 1
            return True

    def release_all(self) -> None:
        """End of `hold_all`; a budget lowered meanwhile (nothing could be evicted) applies now."""
        with self.cond:
            s = self.state
            s.all_pinned -= 1
            over = not s.all_pinned and s.used() > s.budget_bytes
            self.cond.notify_all()
        if over:
            self.set_budget(s.budget_bytes)

    def count_held_step(self, steps: list[tuple[list[Key], list[int]]]) -> None:
        """The accesses of a token computed over held experts, per layer (keys ascending, the
        token slots of each), counted as `acquire_many` counts them: touched together, then hits."""
        s = self.state
        with self.cond:
            s.c.token_slots += sum(sum(n_slots) for _, n_slots in steps)
            s.count_held(steps)

    # ---- control ------------------------------------------------------------------------
    def set_budget(self, budget_bytes: int) -> None:
        """Resize now: evicts unpinned experts until the new budget holds."""
        with self.cond:
            self.state.set_budget(budget_bytes)
            self._drop_evicted()

    def set_policy(self, policy: Policy) -> None:
        with self.cond:
            self.state.policy = policy  # Residency binds it and tells it what is resident

    def _residency_snapshot(self) -> tuple[tuple[int, ...], tuple[Key, ...]]:
        """(resident bytes per layer, sorted resident keys), rebuilt only when residency changed:
        sorting ~2,000 keys every token cost ~1.4 ms of a budgeted Qwen3-slice token at full budget."""
        snap = getattr(self, "_snapshot", None)
        if snap is None or snap[0] != self.state.version:
            per_layer = [0] * self.n_layers
            for layer, e in self.state.resident:
                per_layer[layer] += self.state.sizes[(layer, e)]
            snap = self._snapshot = (self.state.version, tuple(per_layer), tuple(sorted(self.state.resident)))
        return snap[1], snap[2]

    def step_stats(self) -> CacheStats:
        """Counters since the previous call, plus the current residency."""
        with self.cond:
            per_layer, keys = self._residency_snapshot()
            c = self.state.take_counters()
            return CacheStats(c.hits, c.misses, c.evictions, c.prefetch_issued, c.prefetch_hits, c.prefetch_wasted,
                              c.bytes_read, c.stall_s, self.state.resident_bytes, self.state.budget_bytes,
                              per_layer, keys, c.low_served, c.low_token_slots,
                              c.token_slots, self.low.nbytes if self.low else 0)

    def close(self) -> None:
        if self._loads is not None:
            self._loads.put(None)
            self._loader.join(timeout=5)
            self._loads = None
        with self.cond:
            if self.low is not None:
                self.low.close()
            for expert in self.experts.values():
                expert.close()
            self.experts.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
                self.loader.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
