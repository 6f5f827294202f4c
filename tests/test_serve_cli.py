"""`edgemoe serve` from the command line: a tuning profile's settings reach the server, bad
options are one clear error."""
from __future__ import annotations

import subprocess
import sys

from serve_fixtures import metrics, request, server_process

from edgemoe.demo import demo_gguf
from edgemoe.tune.profile import Profile, save_profile

MIB = 2**20


def test_profile_sets_budget_and_context_and_flags_override_it(tmp_path):
    demo = demo_gguf()
    profile = save_profile(Profile(model=str(demo), budget_bytes=6 * MIB, policy="lfu", prefetch=True, threads=1,
                                   ctx=256, model_bytes=demo.stat().st_size, budget_share=0.47, confirmed=True,
                                   created_by="test", created_at="2026-11-24T23:00:00", measured={}),
                           tmp_path / "profile.yaml")
    with server_process("--profile", str(profile), "--ctx", "200", "--api-key", "k") as (base, _):
        auth = {"authorization": "Bearer k"}
        assert metrics(base, auth)["edgemoe_expert_budget_bytes"] == 6 * MIB  # from the profile
        status, body, _ = request(base, "GET", "/v1/models", headers=auth)
        assert status == 200 and body["data"][0]["context_length"] == 200  # the flag wins over the profile
        status, body, _ = request(base, "POST", "/v1/completions", {"prompt": "The os module", "max_tokens": 4},
                                  headers=auth)
        assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
        seen = metrics(base, auth)
        assert seen["edgemoe_expert_prefetch_issued_total"] > 0  # prefetch: on in the profile


def test_bad_option_is_one_clear_error():
    run = subprocess.run([sys.executable, "-m", "edgemoe.cli", "serve", "--queue", "-1"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "--queue -1" in run.stderr and "Traceback" not in run.stderr
