"""Checkpoints written straight with numpy + safetensors (no transformers): for tests that need
a model of a chosen size or a deliberately broken folder, built in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def write_bpe_tokenizer(out: Path, vocab_size: int = 300) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))


def write_mixtral(out: Path, hidden: int = 256, ff: int = 256, n_experts: int = 4, n_layers: int = 2,
                  seed: int = 0, vocab: int = 300) -> Path:
    """A Mixtral-layout checkpoint, one safetensors shard per layer (so writing it never holds
    more than a layer). Returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05)

    write_bpe_tokenizer(out, vocab)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": ff, "num_hidden_layers": n_layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": n_experts,
              "num_experts_per_tok": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config))
    kv = hidden // 2
    save_file({"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float32)}, str(out / "model-00000.safetensors"))
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": np.ones(hidden, np.float32),
             p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
             p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv, hidden),
             p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
             p + "block_sparse_moe.gate.weight": w(n_experts, hidden)}
        for e in range(n_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"], t[q + "w3.weight"], t[q + "w2.weight"] = w(ff, hidden), w(ff, hidden), w(hidden, ff)
        save_file(t, str(out / f"model-{layer + 1:05d}.safetensors"))
    return out
