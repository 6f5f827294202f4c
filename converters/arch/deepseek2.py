"""DeepSeek-V2 (and V2-Lite): llama.cpp architecture `deepseek2`, multi-head latent attention.

llama.cpp runs MLA in its "absorbed" form: the KV cache holds the compressed latent
(kv_lora_rank) plus the shared RoPE key, so the file describes one KV head of width
kv_lora_rank + qk_rope_head_dim, and kv_b_proj is split into attn_k_b (transposed, applied
to the query) and attn_v_b (applied after attention). Layout follows llama.cpp's own
converter (DeepseekV2Model). HF and llama.cpp both rotate interleaved pairs of the RoPE part
(HF through complex numbers, llama.cpp with NORM rope), so no Q/K permutation.
"""
from __future__ import annotations

import gguf
import numpy as np
from gguf import MODEL_TENSOR as T

from edgemoe.converters.arch.base import ArchConverter, PlannedTensor, register
from edgemoe.converters.errors import ConvertError
from edgemoe.converters.hf_checkpoint import HFCheckpoint


@register("DeepseekV2ForCausalLM")
class Deepseek2Converter(ArchConverter):
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK2

    def __init__(self, ckpt: HFCheckpoint):
        super().__init__(ckpt)
        # what llama.cpp is told: MLA as MQA (one KV head); the base class must not write
        # key/value length from head_dim, this class writes the MLA widths itself
        self.hp = {**ckpt.config, "num_key_value_heads": 1, "head_dim": None}

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        self._check_supported()
        super().write_hparams(w)
        kv_lora, rope_dim = self._require("kv_lora_rank"), self._require("qk_rope_head_dim")
        w.add_leading_dense_block_count(hp.get("first_k_dense_replace") or 0)
        # llama.cpp reads q_lora_rank as required unless it guesses a "lite" model from the
        # layer count; 0 means "plain attn_q", which is what a null q_lora_rank is
        w.add_q_lora_rank(hp.get("q_lora_rank") or 0)
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + rope_dim)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(self._require("qk_nope_head_dim") + rope_dim)
        w.add_value_length_mla(self._require("v_head_dim"))
        w.add_expert_feed_forward_length(self._require("moe_intermediate_size"))
        w.add_expert_shared_count(hp["n_shared_experts"])
        w.add_expert_weights_scale(float(hp.get("routed_scaling_factor") or 1.0))
        if hp.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_rope_dimension_count(rope_dim)
        self._write_yarn(w)

    def check_rope_scaling(self) -> None:
        if self._rope_kind() != "yarn":  # YaRN is handled by _write_yarn
            super().check_rope_scaling()

    def _rope_kind(self) -> str | None:
        rope = self.rope_scaling()
        return rope.get("rope_type", rope.get("type"))

    def _write_yarn(self, w: gguf.GGUFWriter) -> None:
        """DeepSeek-V2(-Lite) ships YaRN with mscale == mscale_all_dim: HF then leaves cos/sin
        unscaled and multiplies the softmax scale by yarn_mscale(factor, mscale_all_dim)^2.
        llama.cpp's deepseek2 graph computes that from yarn_log_mul = 0.1 * mscale_all_dim
        (the 0.1 is llama.cpp's legacy encoding), and assumes mscale == mscale_all_dim."""
        if self._rope_kind() != "yarn":
            return
        rope, cfg = self.rope_scaling(), self.ckpt.folder / "config.json"
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if not mscale_all or mscale != mscale_all or rope.get("attention_factor") is not None \
                or rope.get("truncate") is False:
            raise ConvertError(f"{cfg}: YaRN rope scaling {rope} is not supported; llama.cpp's deepseek2 computes "
                               "DeepSeek's YaRN only with mscale == mscale_all_dim (both set), no attention_factor, "
                               "truncate unset or true")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
        w.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all))

    def _check_supported(self) -> None:
        hp, cfg = self.hp, self.ckpt.folder / "config.json"
        if not hp.get("n_shared_experts"):
            raise ConvertError(f"{cfg}: n_shared_experts={hp.get('n_shared_experts')}; llama.cpp's deepseek2 "
                               "needs at least one shared expert in every MoE layer")
        if (hp.get("moe_layer_freq") or 1) != 1:
            raise ConvertError(f"{cfg}: moe_layer_freq={hp['moe_layer_freq']} is not supported; llama.cpp's "
                               "deepseek2 makes every layer after first_k_dense_replace an MoE layer")
        method = hp.get("topk_method") or "greedy"
        groups, used = hp.get("n_group") or 1, hp.get("topk_group") or hp.get("n_group") or 1
        if method not in ("greedy", "group_limited_greedy") or (method != "greedy" and used < groups):
            raise ConvertError(f"{cfg}: topk_method={method!r} (n_group={groups}, topk_group={used}) is not "
                               "supported; llama.cpp's deepseek2 picks the top-k experts over all experts (greedy)")

    def extra_tensors(self, hf_name: str) -> list[PlannedTensor] | None:
        if not hf_name.endswith("self_attn.kv_b_proj.weight"):
            return None
        n_head = self._require("num_attention_heads")
        nope, v_dim = self._require("qk_nope_head_dim"), self._require("v_head_dim")
        rows, kv_lora = self.ckpt.shape(hf_name)
        if rows != n_head * (nope + v_dim):
            raise ConvertError(f"{hf_name}: shape {(rows, kv_lora)} does not match num_attention_heads={n_head} "
                               f"x (qk_nope_head_dim={nope} + v_head_dim={v_dim}); config.json and weights disagree")

        def split(part: int) -> np.ndarray:
            # kv_b: [n_head * (nope + v), kv_lora], per head the nope rows come first
            kv_b = self.ckpt.load(hf_name).reshape(n_head, nope + v_dim, kv_lora)
            if part == 0:  # k_b: [n_head, kv_lora, nope], multiplies q_nope into latent space
                return np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            return np.ascontiguousarray(kv_b[:, nope:])  # v_b: [n_head, v, kv_lora]

        layer = int(hf_name.split(".")[2])
        k_b, v_b = (gguf.TENSOR_NAMES[t].format(bid=layer) + ".weight" for t in (T.ATTN_K_B, T.ATTN_V_B))
        return [PlannedTensor(k_b, (n_head, kv_lora, nope), [lambda: split(0)], layer=layer),
                PlannedTensor(v_b, (n_head, v_dim, kv_lora), [lambda: split(1)], layer=layer)]
