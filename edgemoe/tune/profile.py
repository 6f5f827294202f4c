"""Tuning profiles: the setting `edgemoe tune` chose for one model on one machine, as YAML that
`generate` (and `chat`) take with `--profile FILE`.

Engine fields (model, budget_bytes, policy, prefetch, threads, ctx) are applied; the rest records
where the setting came from (what was measured and predicted, the machine, the memory cap).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from edgemoe.errors import InputError
from edgemoe.memory import parse_bytes
from edgemoe.policies import ONLINE_POLICIES

FORMAT = "edgemoe-profile/1"
SELECTABLE_POLICIES = ONLINE_POLICIES  # belady needs the future: not a setting
REQUIRED = ("model", "budget_bytes", "policy", "prefetch", "threads", "ctx")
INFO = ("format", "model_bytes", "budget_share", "confirmed", "created_by", "created_at", "max_memory_bytes",
        "measured", "predicted", "machine")


class ProfileError(InputError):
    """A profile file that is missing, not YAML, or has a field of the wrong kind."""


@dataclass(frozen=True)
class Profile:
    model: str
    budget_bytes: int
    policy: str
    prefetch: bool
    threads: int | None
    ctx: int
    model_bytes: int | None = None
    budget_share: float | None = None
    confirmed: bool = False              # measured by a real run, not only predicted
    created_by: str = ""
    created_at: str = ""
    max_memory_bytes: int | None = None
    measured: dict = field(default_factory=dict)   # tokens_per_s, hit_rate, peak_rss_bytes
    predicted: dict = field(default_factory=dict)  # the same, from the simulation and cost model
    machine: dict = field(default_factory=dict)

    def check_model(self, path: str | os.PathLike, source: str = "profile") -> None:
        """Refuse a model other than the one tuned: its budget in bytes means nothing elsewhere."""
        path = Path(path)
        same_name = path.name == Path(self.model).name
        size = path.stat().st_size if path.exists() else None
        if not same_name or (self.model_bytes is not None and size is not None and size != self.model_bytes):
            raise ProfileError(f"{source}: field 'model' is {self.model} ({self.model_bytes} bytes) but the model "
                               f"given is {path} ({size} bytes); run `edgemoe tune {path}` for a profile of it")


def save_profile(profile: Profile, path: str | os.PathLike) -> Path:
    path = Path(path)
    data = {"format": FORMAT, **{k: v for k, v in asdict(profile).items()}}
    text = ("# written by `edgemoe tune`; apply with `edgemoe generate --profile FILE`\n"
            + yaml.safe_dump(data, sort_keys=False))
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def load_profile(path: str | os.PathLike) -> Profile:
    path = Path(path)
    data = _read_fields(path)

    def bad(name: str, want: str) -> ProfileError:
        return ProfileError(f"profile {path}: field {name!r} must be {want}, got {data[name]!r}")

    budget = _engine_fields(data, bad)
    if isinstance(data.get("created_at"), datetime.date):  # YAML reads an unquoted timestamp as a date
        data["created_at"] = data["created_at"].isoformat()
    kinds = {int: "an integer", bool: "true or false", str: "text", dict: "a mapping"}
    for name, kind in (("model_bytes", int), ("max_memory_bytes", int), ("budget_share", (int, float)),
                       ("confirmed", bool), ("created_by", str), ("created_at", str), ("measured", dict),
                       ("predicted", dict), ("machine", dict)):
        if data.get(name) is not None and not isinstance(data[name], kind):
            raise bad(name, kinds.get(kind, "a number"))
    fields = {k: v for k, v in data.items() if k != "format" and (v is not None or k in REQUIRED)}
    return Profile(**{**fields, "budget_bytes": budget})


def _read_fields(path: Path) -> dict:
    """The YAML mapping, with known field names only and every required one present."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"profile {path} does not exist; write one with `edgemoe tune MODEL.gguf -o FOLDER`") \
            from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path}: expected a mapping of fields (model, budget_bytes, policy, ...), "
                           f"got {type(data).__name__}")
    if data.get("format", FORMAT) != FORMAT:
        raise ProfileError(f"profile {path}: field 'format' is {data['format']!r}; this edgemoe reads {FORMAT!r}")
    unknown = sorted(set(data) - set(REQUIRED) - set(INFO), key=str)
    if unknown:
        raise ProfileError(f"profile {path}: unknown field {unknown[0]!r}; known fields: "
                           f"{', '.join(REQUIRED + INFO[1:])}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ProfileError(f"profile {path}: missing field {missing[0]!r}")
    return data


def _engine_fields(data: dict, bad) -> int:
    """Check the fields `--profile` applies; returns budget_bytes (a byte string is accepted)."""
    if not isinstance(data["model"], str) or not data["model"]:
        raise bad("model", "the path of a .gguf file")
    try:
        budget = parse_bytes(data["budget_bytes"]) if not isinstance(data["budget_bytes"], bool) else -1
    except (ValueError, TypeError, AttributeError):
        budget = -1
    if budget <= 0:
        raise bad("budget_bytes", "a positive byte count (e.g. 805306368 or 768MiB)")
    if data["policy"] not in SELECTABLE_POLICIES:
        raise bad("policy", "one of " + ", ".join(SELECTABLE_POLICIES)
                  + (" (belady needs the future accesses of a recorded trace)" if data["policy"] == "belady" else ""))
    if not isinstance(data["prefetch"], bool):
        raise bad("prefetch", "true or false")
    threads = data["threads"]
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise bad("threads", "a thread count >= 1 (or null for all cores)")
    if isinstance(data["ctx"], bool) or not isinstance(data["ctx"], int) or data["ctx"] < 1:
        raise bad("ctx", "a context length in tokens >= 1")
    return budget
