"""What every architecture converter shares: hparams from HF config names, tensor-name
mapping through gguf-py's tables, and per-expert grouping of the hub's expert tensors.

An architecture module subclasses `ArchConverter`, registers the HF architecture names it
handles with `@register(...)`, and overrides only what differs (extra hparams, a tensor
transform, which hub names hold experts).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import gguf
import numpy as np
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as QT

from edgemoe.converters.errors import ConvertError
from edgemoe.converters.hf_checkpoint import HFCheckpoint

Loader = Callable[[], np.ndarray]


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, numpy-order shape, and loaders whose outputs, concatenated
    along axis 0 and reshaped to `shape`, give the tensor (one loader per expert for 3-D
    expert tensors, so memory stays near one expert)."""
    name: str
    shape: tuple[int, ...]
    parts: list[Loader]
    keep_f32: bool = False  # norms, biases, routers: llama.cpp keeps these F32
    raw_qtype: QT | None = None  # parts already yield bytes in this type (no quantization)
    layer: int | None = None
    expert_tensor: bool = False
    qtype: QT | None = None  # quantize to this type instead of the requested one (rows that do not fit fall back)
    imatrix: np.ndarray | None = None  # float32 [shape[-1]] column importance for ggml's quantizer


@dataclass
class ExpertSlots:
    """Hub names of one layer's experts: proj -> expert id -> tensor name."""
    by_proj: dict[str, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))


_REGISTRY: dict[str, type["ArchConverter"]] = {}


def register(*hf_architectures: str):
    def deco(cls: type[ArchConverter]) -> type[ArchConverter]:
        for name in hf_architectures:
            _REGISTRY[name] = cls
        cls.hf_architectures = hf_architectures
        return cls
    return deco


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def converter_for(ckpt: HFCheckpoint) -> "ArchConverter":
    arch = ckpt.architecture
    cls = _REGISTRY.get(arch)
    if cls is None:
        raise ConvertError(f"architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}")
    return cls(ckpt)


class ArchConverter:
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    # hub per-expert names: groups (layer, expert, proj)
    expert_regex: ClassVar[re.Pattern] = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
    proj_tensor: ClassVar[dict[str, T]] = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP,
                                           "down_proj": T.FFN_DOWN_EXP}
    # transformers' in-memory fused form, also accepted: [E, 2F, D] and [E, D, F]
    fused_regex: ClassVar[re.Pattern] = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
    f32_tensors: ClassVar[tuple[T, ...]] = (T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP)
    # llama.cpp loaders of some archs need output.weight (no fallback to token_embd): a tied
    # checkpoint (no lm_head) then gets a copy of the embedding
    requires_output: ClassVar[bool] = False

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self.hp = ckpt.config
        self.n_layers = self._require("num_hidden_layers")
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)
        self._f32_names = {gguf.TENSOR_NAMES[t].format(bid=b) for t in self.f32_tensors for b in range(self.n_layers)}

    # ---- metadata -------------------------------------------------------------------------
    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def _require(self, key: str):
        if key not in self.hp or self.hp[key] is None:
            raise ConvertError(f"{self.ckpt.folder / 'config.json'} lacks {key!r}, which "
                               f"{self.ckpt.architecture} needs")
        return self.hp[key]

    def rope_theta(self) -> float | None:
        rope = self.hp.get("rope_parameters") or {}
        return self.hp.get("rope_theta", rope.get("rope_theta"))

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        w.add_block_count(self.n_layers)
        w.add_context_length(self._require("max_position_embeddings"))
        w.add_embedding_length(self._require("hidden_size"))
        if hp.get("intermediate_size"):
            w.add_feed_forward_length(hp["intermediate_size"])
        n_head = self._require("num_attention_heads")
        w.add_head_count(n_head)
        w.add_head_count_kv(hp.get("num_key_value_heads") or n_head)
        if (theta := self.rope_theta()) is not None:
            w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
        w.add_expert_count(self.n_experts())
        w.add_expert_used_count(self._require("num_experts_per_tok"))
        if hp.get("head_dim"):
            w.add_key_length(hp["head_dim"])
            w.add_value_length(hp["head_dim"])
        w.add_vocab_size(self._require("vocab_size"))
        self.check_rope_scaling()

    def rope_scaling(self) -> dict:
        """Hub configs name it rope_scaling; transformers >= 5 saves rope_parameters."""
        return self.hp.get("rope_scaling") or self.hp.get("rope_parameters") or {}

    def check_rope_scaling(self) -> None:
        rope = self.rope_scaling()
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in (None, "default"):
            raise ConvertError(f"rope scaling {kind!r} in config.json is not supported yet by edgemoe convert")

    def n_experts(self) -> int:
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if self.hp.get(key):
                return int(self.hp[key])
        raise ConvertError(f"{self.ckpt.folder / 'config.json'} names no expert count "
                           "(num_local_experts / num_experts / n_routed_experts); is this a MoE model?")

    # ---- tensors --------------------------------------------------------------------------
    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        """Per-tensor rewrite between HF's and llama.cpp's conventions (default: none)."""
        return data

    def extra_tensors(self, hf_name: str) -> list[PlannedTensor] | None:
        """Hook for one HF tensor that becomes several GGUF tensors (or none); None = default."""
        return None

    def plan(self) -> list[PlannedTensor]:
        experts: dict[int, ExpertSlots] = defaultdict(ExpertSlots)
        fused: dict[int, dict[str, str]] = defaultdict(dict)
        planned: list[PlannedTensor] = []
        for name in self.ckpt.tensors:
            if m := self.expert_regex.fullmatch(name):
                layer, expert, proj = int(m[1]), int(m[2]), m[3]
                if proj not in self.proj_tensor:
                    raise ConvertError(f"unexpected expert tensor {name} in {self.ckpt.folder}")
                experts[layer].by_proj[proj][expert] = name
            elif m := self.fused_regex.fullmatch(name.removesuffix(".weight")):
                fused[int(m[1])][m[2]] = name
            elif (special := self.extra_tensors(name)) is not None:
                planned.extend(special)
            else:
                planned.append(self._plan_dense(name))
        for layer in sorted(experts):
            planned.extend(self._plan_experts(layer, experts[layer]))
        for layer in sorted(fused):
            planned.extend(self._plan_fused_experts(layer, fused[layer]))
        if self.requires_output and not any(t.name == "output.weight" for t in planned):
            planned.append(self._plan_tied_output())
        return planned

    def _plan_tied_output(self) -> PlannedTensor:
        embed = "model.embed_tokens.weight"
        if not self.ckpt.has(embed):
            raise ConvertError(f"{self.ckpt.folder}: no lm_head.weight and no {embed} to tie it to")
        return PlannedTensor(gguf.TENSOR_NAMES[T.OUTPUT] + ".weight", self.ckpt.shape(embed),
                             [lambda: self.ckpt.load(embed)])

    def gguf_name(self, hf_name: str) -> str:
        new = self.tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConvertError(f"cannot map tensor {hf_name!r} of {self.ckpt.architecture} to a GGUF name")
        return new

    def _plan_dense(self, hf_name: str) -> PlannedTensor:
        name = self.gguf_name(hf_name)
        shape = self.ckpt.shape(hf_name)
        keep_f32 = len(shape) == 1 or name.rsplit(".", 1)[0] in self._f32_names
        return PlannedTensor(name, shape, [lambda n=hf_name: self.transform(n, self.ckpt.load(n))],
                             keep_f32=keep_f32, layer=_layer_of(name))

    def _plan_experts(self, layer: int, slots: ExpertSlots) -> list[PlannedTensor]:
        n_expert = self.n_experts()
        out = []
        for proj, tensor in self.proj_tensor.items():
            by_id = slots.by_proj.get(proj, {})
            if sorted(by_id) != list(range(n_expert)):
                missing = sorted(set(range(n_expert)) - set(by_id))
                raise ConvertError(f"layer {layer}: expert {proj} tensors missing for experts {missing}")
            one = self.ckpt.shape(by_id[0])
            parts = [lambda n=by_id[e]: self.ckpt.load(n) for e in range(n_expert)]
            out.append(PlannedTensor(_weight(tensor, layer), (n_expert, *one), parts,
                                     layer=layer, expert_tensor=True))
        return out

    def _plan_fused_experts(self, layer: int, names: dict[str, str]) -> list[PlannedTensor]:
        if set(names) != {"gate_up_proj", "down_proj"}:
            raise ConvertError(f"layer {layer}: fused experts need gate_up_proj and down_proj, found {sorted(names)}")
        e, two_f, d = self.ckpt.shape(names["gate_up_proj"])
        f = two_f // 2

        def half(which: int, idx: int) -> np.ndarray:  # [F, D] slice of gate_up for one expert
            return self.ckpt.load(names["gate_up_proj"], index=idx)[which * f:(which + 1) * f]

        gate = [lambda i=i: half(0, i) for i in range(e)]
        up = [lambda i=i: half(1, i) for i in range(e)]
        down = [lambda i=i: self.ckpt.load(names["down_proj"], index=i) for i in range(e)]
        return [PlannedTensor(_weight(T.FFN_GATE_EXP, layer), (e, f, d), gate, layer=layer, expert_tensor=True),
                PlannedTensor(_weight(T.FFN_UP_EXP, layer), (e, f, d), up, layer=layer, expert_tensor=True),
                PlannedTensor(_weight(T.FFN_DOWN_EXP, layer), (e, d, f), down, layer=layer, expert_tensor=True)]


def _weight(tensor: T, layer: int) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight"


def _layer_of(gguf_name: str) -> int | None:
    parts = gguf_name.split(".")
    return int(parts[1]) if parts[0] == "blk" else None
