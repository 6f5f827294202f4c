"""Tiny seeded HF checkpoints of every supported MoE architecture, for tests. Seconds each.

    python -m edgemoe.models.tiny ARCH OUT [--seed 0]

Built with transformers' own model classes and `save_pretrained`, so config.json, tensor names
(per-expert, as on the hub) and tokenizer files look like the real checkpoints the converter
reads. Weights come from a seeded generator, not the library's init: std ~0.06 keeps every
layer's activations O(1) (hidden 256: a row of 256 weights sums to std ~1), routers are scaled up
so routing is clearly non-uniform, and norm weights/biases are perturbed away from 1/0 so a
missing norm or bias shows up as a logit mismatch. Cached by (arch, seed) under
`cache_dir("tiny")`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from edgemoe.models.cache import build_once, cache_dir
from edgemoe.models.corpus import load_corpus
from edgemoe.models.tokenizer import EOT, train_bpe, train_sentencepiece

TINY_VERSION = 1  # bump when the build changes in a way the spec digest below cannot see
TOKENIZER_DOCS = 3000  # first documents of the train split: enough for a small vocab, ~0.1 s
TINY_VOCAB = 768
WEIGHT_STD = 0.06
ROUTER_GAIN = 4.0  # router logits std ~4: top-2 of 8 is decisive, not near-uniform
NORM_JITTER = 0.1
BIAS_STD = 0.05

COMMON = dict(
    hidden_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=None,
)


@dataclass(frozen=True)
class TinyArch:
    """How to build one architecture: HF class name, tokenizer family, config fields."""

    model_class: str
    tokenizer: str  # "bpe" or "sentencepiece"
    config: dict


ARCHS: dict[str, TinyArch] = {
    "mixtral": TinyArch("MixtralForCausalLM", "sentencepiece", dict(
        num_key_value_heads=2, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=None)),
    "qwen2moe": TinyArch("Qwen2MoeForCausalLM", "bpe", dict(
        num_key_value_heads=2, intermediate_size=512, moe_intermediate_size=256,
        shared_expert_intermediate_size=512, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # DeepSeek-V2-Lite shape: no q LoRA, MLA latent KV, 2 shared experts, leading dense layer.
    "deepseek2": TinyArch("DeepseekV2ForCausalLM", "bpe", dict(
        num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=256,
        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "olmoe": TinyArch("OlmoeForCausalLM", "bpe", dict(
        num_key_value_heads=2, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, clip_qkv=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # head_dim 128 != hidden/heads (64), as in Qwen3-30B-A3B (2048 hidden, 32 x 128 heads).
    "qwen3moe": TinyArch("Qwen3MoeForCausalLM", "bpe", dict(
        num_key_value_heads=2, head_dim=128, intermediate_size=512, moe_intermediate_size=256,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}


def tiny_tokenizer(kind: str) -> Path:
    """Cached tokenizer folder of the given family, trained on a slice of the corpus."""
    path = cache_dir("tokenizers") / f"{kind}-{TINY_VOCAB}-v{TINY_VERSION}"
    if (path / "tokenizer_config.json").exists():
        return path
    train = {"bpe": train_bpe, "sentencepiece": train_sentencepiece}[kind]
    texts = load_corpus().train[:TOKENIZER_DOCS]
    return build_once(path, lambda tmp: train(
        texts, TINY_VOCAB, tmp, model_max_length=COMMON["max_position_embeddings"]))


def _special_ids(tokenizer_dir: Path, kind: str) -> dict:
    if kind == "sentencepiece":
        return {"bos_token_id": 1, "eos_token_id": 2}
    from tokenizers import Tokenizer

    eot = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(EOT)
    return {"bos_token_id": eot, "eos_token_id": eot}


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one generator, in sorted-name order (independent of module
    construction order and of the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("bias"):
            param.copy_(noise * BIAS_STD)
        elif param.dim() == 1:  # RMSNorm weights
            param.copy_(1.0 + NORM_JITTER * noise)
        elif "embed_tokens" in name:
            param.copy_(noise)  # unit-scale inputs; the first norm rescales anyway
        elif name.endswith("mlp.gate.weight"):  # MoE routers [E, D], in every arch here
            param.copy_(noise * WEIGHT_STD * ROUTER_GAIN)
        else:
            param.copy_(noise * WEIGHT_STD)


def tiny_model(arch: str, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """The seeded in-memory model of `arch` (a transformers *ForCausalLM, eval mode, f32) and
    its tokenizer folder."""
    import transformers

    spec = ARCHS[arch]
    tok_dir = tiny_tokenizer(spec.tokenizer)
    model_cls = getattr(transformers, spec.model_class)
    config = model_cls.config_class(
        vocab_size=_vocab_size(tok_dir), **COMMON, **spec.config,
        **_special_ids(tok_dir, spec.tokenizer))
    torch.manual_seed(seed)  # the library init runs first; seeded_init then overwrites it all
    model = model_cls(config).eval()
    seeded_init(model, seed)
    return model, tok_dir


def _vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()


@torch.no_grad()
def _check_reload(model, out: Path) -> None:
    """from_pretrained silently re-initialises weights it cannot match by name; a tiny checkpoint
    that does not reload exactly would make every parity test compare against noise."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    expected = model.state_dict()
    if loaded.keys() != expected.keys():
        raise RuntimeError(f"tiny checkpoint {out} reloads with different parameters: "
                           f"{sorted(loaded.keys() ^ expected.keys())[:5]}")
    for name, tensor in loaded.items():
        if not torch.equal(tensor, expected[name]):
            raise RuntimeError(f"tiny checkpoint {out}: {name} does not reload to the saved values; "
                               "this transformers version may save names it cannot load back")


def _build(arch: str, seed: int, out: Path) -> None:
    model, tok_dir = tiny_model(arch, seed)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    _check_reload(model, out)


def _spec_digest(arch: str) -> str:
    """Cache key part that changes whenever the config, the init constants or the transformers
    version change, so an edited spec never reuses a stale checkpoint."""
    import transformers

    key = repr((TINY_VERSION, ARCHS[arch], COMMON, TINY_VOCAB, TOKENIZER_DOCS, WEIGHT_STD,
                ROUTER_GAIN, NORM_JITTER, BIAS_STD, transformers.__version__))
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def tiny_checkpoint(arch: str, seed: int = 0) -> Path:
    """Cached checkpoint folder for (arch, seed), built on first use. Treat it as read-only."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(ARCHS)}")
    path = cache_dir("tiny") / f"{arch}-seed{seed}-{_spec_digest(arch)}"
    if (path / "model.safetensors").exists():
        return path
    return build_once(path, lambda tmp: _build(arch, seed, tmp))


def build_tiny(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny (arch, seed) checkpoint into `out_dir` (a copy of the cached build)."""
    out_dir = Path(out_dir)
    shutil.copytree(tiny_checkpoint(arch, seed), out_dir, dirs_exist_ok=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny seeded HF MoE checkpoint.")
    parser.add_argument("arch", choices=sorted(ARCHS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny(args.arch, args.out, args.seed))


if __name__ == "__main__":
    main()
