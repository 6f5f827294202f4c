"""Routing traces: which experts every token chose in every MoE layer, step by step.

A step is one forward pass (the prompt's prefill, then one per generated token). Traces feed
`edgemoe simulate` (policy/budget replay), Belady's policy, `edgemoe tune`, and predictors.

Optional field `router_logits` (traces recorded by the edgemoe engine; absent in older traces and
in llama.cpp ones): per step, per MoE layer, the step's last token's router look-ahead rows
(`edgemoe.predictor.lookahead`): this layer's and the next up to 3 layers' router logits on this
layer's MoE input. It lets the simulator evaluate router speculation and the learned predictor
without running the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgemoe.errors import InputError
from edgemoe.policies import Key

FORMAT = "edgemoe-trace/1"


class TraceError(InputError):
    """A trace file that is missing, malformed, or for another model."""


@dataclass
class Trace:
    model: str
    n_experts: int
    top_k: int
    moe_layers: list[int]
    expert_bytes: dict[Key, int]
    # steps[s][layer] = [[e, ...top_k] per token]
    steps: list[dict[int, list[list[int]]]] = field(default_factory=list)
    # router_logits[s][layer] = [[E floats] per look-ahead row], or None when not recorded
    router_logits: list[dict[int, list[list[float]]]] | None = None

    def demand_sequence(self) -> list[Key]:
        """The cache's demand accesses, in the engine's order: per step, per layer ascending,
        each distinct expert once, ascending id."""
        seq: list[Key] = []
        for step in self.steps:
            for layer in sorted(step):
                seq.extend((layer, e) for e in sorted({e for tok in step[layer] for e in tok}))
        return seq

    def sliced(self, start: int, stop: int | None = None) -> "Trace":
        """The trace of steps [start, stop): e.g. a head to train a predictor on, the rest kept
        to score it (`edgemoe simulate --score-from`)."""
        logits = self.router_logits[start:stop] if self.router_logits is not None else None
        return Trace(self.model, self.n_experts, self.top_k, list(self.moe_layers), dict(self.expert_bytes),
                     self.steps[start:stop], logits)

    def tokens_per_step(self) -> list[int]:
        return [len(next(iter(step.values()))) if step else 0 for step in self.steps]

    def save(self, path: str | os.PathLike) -> None:
        data = {"format": FORMAT, "model": self.model, "n_experts": self.n_experts, "top_k": self.top_k,
                "moe_layers": self.moe_layers,
                "expert_bytes": [[l, e, b] for (l, e), b in sorted(self.expert_bytes.items())],
                "steps": [{str(l): ids for l, ids in step.items()} for step in self.steps]}
        if self.router_logits is not None:
            data["router_logits"] = [{str(l): rows for l, rows in step.items()} for step in self.router_logits]
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TraceError(f"trace file {path} does not exist; record one with `edgemoe trace`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceError(f"{path} is not a trace file ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TraceError(f"{path} is not an {FORMAT} file")
        try:
            trace = cls(data["model"], int(data["n_experts"]), int(data["top_k"]), [int(x) for x in data["moe_layers"]],
                        {(int(l), int(e)): int(b) for l, e, b in data["expert_bytes"]},
                        [{int(l): ids for l, ids in step.items()} for step in data["steps"]])
            if "router_logits" in data:
                trace.router_logits = [{int(l): rows for l, rows in step.items()} for step in data["router_logits"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{path}: malformed trace field ({exc})") from None
        for step in trace.steps:
            for layer, ids in step.items():
                if layer not in trace.moe_layers or any(not 0 <= e < trace.n_experts for tok in ids for e in tok):
                    raise TraceError(f"{path}: step refers to layer {layer} / experts outside the model")
        if trace.router_logits is not None and (len(trace.router_logits) != len(trace.steps) or any(
                len(row) != trace.n_experts for step in trace.router_logits for rows in step.values() for row in rows)):
            raise TraceError(f"{path}: router_logits do not match the steps ({len(trace.router_logits)} vs "
                             f"{len(trace.steps)}) or the expert count {trace.n_experts}")
        return trace


class TraceRecorder:
    """Attach to an engine's MoE blocks; each forward pass becomes one step.

    router_logits: also record the look-ahead rows (one small matmul per layer and step)."""

    def __init__(self, engine, router_logits: bool = True):
        from edgemoe.predictor.lookahead import RouterLookahead

        self.engine = engine
        blocks = engine.model.moe_blocks
        self.trace = Trace(str(engine.path.name), int(engine.file.arch_field("expert_count")),
                           int(engine.file.arch_field("expert_used_count")), [b.layer for b in blocks],
                           {k: s.alloc_bytes for k, s in engine.specs.items()}, [], [] if router_logits else None)
        self._index = {b.layer: i for i, b in enumerate(blocks)}
        self._lookahead = RouterLookahead(blocks, self.trace.n_experts) if router_logits else None
        self._current: dict[int, list[list[int]]] = {}
        self._logits: dict[int, list[list[float]]] = {}
        for b in blocks:
            b.recorders.append(self._record)
            if router_logits:
                b.observers.append(self._observe)

    def _observe(self, layer: int, x) -> None:
        if layer in self._current:  # a new forward pass began
            self.flush()
        rows = self._lookahead.rows(self._index[layer], x[-1])
        self._logits[layer] = rows.double().round(decimals=4).tolist()  # doubles: short JSON numbers

    def _record(self, layer: int, ids) -> None:
        if layer in self._current:
            self.flush()
        self._current[layer] = ids.tolist()

    def flush(self) -> None:
        if self._current:
            self.trace.steps.append(self._current)
            if self.trace.router_logits is not None:
                self.trace.router_logits.append(self._logits)
            self._current, self._logits = {}, {}

    def detach(self) -> Trace:
        self.flush()
        for b in self.engine.model.moe_blocks:
            b.recorders.remove(self._record)
            if self._observe in b.observers:
                b.observers.remove(self._observe)
        return self.trace


def load_traces(path: str | os.PathLike) -> list[tuple[Path, Trace]]:
    """One trace file, or every trace file (*.json, name order) in a folder."""
    path = Path(path)
    if not path.is_dir():
        return [(path, Trace.load(path))]
    files = sorted(f for f in path.glob("*.json") if f.is_file())
    if not files:
        raise TraceError(f"{path} holds no trace files (*.json); record some with `edgemoe trace -o {path}/NAME.json`")
    return [(f, Trace.load(f)) for f in files]
