"""Tiny reference checkpoints: they must look like hub checkpoints and be worth comparing against
(meaningful logits, decisive routing), or every parity test built on them proves nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgemoe.models.tiny import ARCHS, build_tiny, tiny_model

PROMPT = "def mean(xs):\n    \"\"\"Return the arithmetic mean of the numbers in xs.\"\"\"\n"

# Hub per-expert tensor names of layer 1, expert 0 (transformers fuses experts in memory only).
EXPERT_NAMES = {
    "mixtral": ["block_sparse_moe.experts.0.w1.weight", "block_sparse_moe.experts.0.w2.weight",
                "block_sparse_moe.experts.0.w3.weight", "block_sparse_moe.gate.weight"],
    "qwen2moe": ["mlp.experts.0.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                 "mlp.shared_expert_gate.weight", "self_attn.q_proj.bias"],
    "deepseek2": ["mlp.experts.0.down_proj.weight", "mlp.shared_experts.gate_proj.weight",
                  "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight"],
    "olmoe": ["mlp.experts.0.up_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight"],
    "qwen3moe": ["mlp.experts.0.gate_proj.weight", "self_attn.q_norm.weight"],
}


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids  # [1, T]
    return model, ids


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoint_has_hub_names(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for suffix in EXPERT_NAMES[arch]:
        assert f"model.layers.1.{suffix}" in names
    assert not any("gate_up_proj" in n for n in names), "fused expert tensors on disk"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [ARCHS[arch].model_class]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_reload_matches_in_memory_model(arch, tiny_checkpoint):
    model, ids = _load(tiny_checkpoint(arch))
    fresh, _ = tiny_model(arch, seed=0)
    loaded, expected = model.state_dict(), fresh.state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name
    with torch.no_grad():  # not bitwise: the expert kernels may reduce in a thread-dependent order
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_are_meaningful(arch, tiny_checkpoint):
    model, ids = _load(tiny_checkpoint(arch))
    with torch.no_grad():
        logits = model(ids).logits[0]  # [T, V]
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 0.3, "logits nearly constant over the vocabulary"
    assert (logits - logits.mean(0)).std() > 0.3, "logits nearly the same at every position"
    assert len(set(logits.argmax(-1).tolist())) > 1


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_routing_is_decisive_and_spread(arch, tiny_checkpoint):
    model, ids = _load(tiny_checkpoint(arch))
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits  # per MoE layer [T, E]
    n_experts = router_logits[0].shape[-1]
    for layer_logits in router_logits:
        probs = layer_logits.float().softmax(-1)
        assert probs.max(-1).values.mean() > 3.0 / n_experts, "routing close to uniform"
        assert len(set(probs.argmax(-1).tolist())) >= 3, "routing collapsed onto few experts"


def test_build_tiny_writes_a_loadable_copy(tmp_path):
    out = build_tiny("qwen2moe", tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    model, ids = _load(out)
    assert model.config.shared_expert_intermediate_size == 512


def test_seed_changes_weights():
    a, _ = tiny_model("olmoe", seed=0)
    b, _ = tiny_model("olmoe", seed=1)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_arch_specifics(tiny_checkpoint):
    deepseek = json.loads((tiny_checkpoint("deepseek2") / "config.json").read_text())
    assert deepseek["q_lora_rank"] is None and deepseek["first_k_dense_replace"] == 1
    assert deepseek["n_shared_experts"] == 2 and deepseek["topk_method"] == "greedy"
    qwen3 = json.loads((tiny_checkpoint("qwen3moe") / "config.json").read_text())
    assert qwen3["head_dim"] * qwen3["num_attention_heads"] != qwen3["hidden_size"]
    assert qwen3["norm_topk_prob"] is True
    mixtral = tiny_checkpoint("mixtral")
    assert (mixtral / "tokenizer.model").exists()
