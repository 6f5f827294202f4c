"""Tuning profiles: round trip, clear errors naming the field, and `generate --profile`."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from edgemoe import cli
from edgemoe.commands import common, tune as tune_commands
from edgemoe.tune.profile import Profile, ProfileError, load_profile, save_profile


def _profile(model) -> Profile:
    return Profile(model=str(model), budget_bytes=6 * 2**20, policy="lfu", prefetch=True, threads=1, ctx=256,
                   model_bytes=model.stat().st_size, budget_share=0.47, confirmed=True, created_by="test",
                   created_at="2026-11-24T23:00:00", measured={"tokens_per_s": 200.0})


@pytest.fixture(scope="module")
def demo():
    from edgemoe.demo import demo_gguf
    return demo_gguf()


def test_round_trip(demo, tmp_path):
    p = _profile(demo)
    assert load_profile(save_profile(p, tmp_path / "p.yaml")) == p


def _write(tmp_path, demo, **changes):
    data = yaml.safe_load((save_profile(_profile(demo), tmp_path / "ok.yaml")).read_text())
    for k, v in changes.items():
        if v is _DELETE:
            del data[k]
        else:
            data[k] = v
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


_DELETE = object()


@pytest.mark.parametrize("changes, field", [
    ({"budget_bytes": "lots"}, "budget_bytes"),
    ({"budget_bytes": -5}, "budget_bytes"),
    ({"policy": "fifo"}, "policy"),
    ({"policy": "belady"}, "policy"),
    ({"prefetch": "yes please"}, "prefetch"),
    ({"threads": 0}, "threads"),
    ({"ctx": "long"}, "ctx"),
    ({"model": 3}, "model"),
    ({"measured": [1, 2]}, "measured"),
    ({"budjet_bytes": 5}, "budjet_bytes"),
    ({"policy": _DELETE}, "policy"),
    ({"format": "edgemoe-profile/9"}, "format"),
])
def test_malformed_field_is_named(demo, tmp_path, changes, field):
    with pytest.raises(ProfileError, match=f"'{field}'"):
        load_profile(_write(tmp_path, demo, **changes))


def test_byte_strings_accepted(demo, tmp_path):
    assert load_profile(_write(tmp_path, demo, budget_bytes="6MiB")).budget_bytes == 6 * 2**20


def test_not_a_profile(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(tmp_path / "broken.yaml")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "none.yaml")


def _engine_config(argv):
    args = cli.build_parser().parse_args(argv)
    tune_commands.apply_profile(args, argv)
    return args, common.engine_config(args, args.model)


def test_generate_applies_the_profile(demo, tmp_path):
    path = save_profile(_profile(demo), tmp_path / "p.yaml")
    args, config = _engine_config(["generate", "--profile", str(path)])
    assert args.model == demo  # the profile's model when none is given
    assert (config.budget_bytes, config.policy, config.prefetch, config.n_threads, config.n_ctx) == \
        (6 * 2**20, "lfu", True, 1, 256)
    # options given on the command line win over the profile
    _, config = _engine_config(["generate", str(demo), "--profile", str(path), "--policy", "lru", "--ctx=128"])
    assert (config.budget_bytes, config.policy, config.n_ctx, config.prefetch) == (6 * 2**20, "lru", 128, True)


def test_chat_applies_the_profile(demo, tmp_path):
    path = save_profile(_profile(demo), tmp_path / "p.yaml")
    args, config = _engine_config(["chat", "--profile", str(path), "--threads", "2"])
    assert args.model == demo and args.ctx == 256
    assert (config.budget_bytes, config.policy, config.prefetch, config.n_threads) == (6 * 2**20, "lfu", True, 2)


def test_profile_for_another_model(demo, tmp_path):
    p = _profile(demo)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    path = save_profile(p, tmp_path / "p.yaml")
    with pytest.raises(ProfileError, match="field 'model'"):
        _engine_config(["generate", str(other), "--profile", str(path)])


def test_cli_reports_a_malformed_profile_in_one_line(demo, tmp_path):
    bad = _write(tmp_path, demo, policy="fifo")
    done = subprocess.run([sys.executable, "-m", "edgemoe.cli", "generate", "--profile", str(bad), "-n", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "field 'policy'" in done.stderr and "Traceback" not in done.stderr


def test_cli_generates_with_the_profile(demo, tmp_path):
    path = save_profile(_profile(demo), tmp_path / "p.yaml")
    done = subprocess.run([sys.executable, "-m", "edgemoe.cli", "generate", "--profile", str(path), "-n", "3",
                           "--stats", "-p", "def f(x):"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "/6.0 MiB]" in done.stderr  # resident / budget from the profile, on every token
