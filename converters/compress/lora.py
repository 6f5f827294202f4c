"""Optional stage 3 of MoE-I²: a short LoRA recovery fine-tune of the compressed model, merged
into the weights before export.

Adapters go on the attention projections (q, k, v, o) of every layer: they are dense, shared by
all tokens, and compensate what the pruned/low-rank experts no longer deliver; the experts
themselves stay frozen (their factors are exported as decided). The loss is KL(original ||
compressed) on the calibration windows — distillation from the uncompressed model — rather than
the LM loss: the goal is the original model's behaviour, which is what held-out KL measures,
and a few hundred calibration tokens of LM loss would fit the calibration text instead.

Not streamed: the fine-tune needs the whole model (transformers, float32) in RAM, teacher
logits included. The merged weights go to export as same-shape overrides of the checkpoint's
attention tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from edgemoe.bench.quality import QualitySums, kl_rows
from edgemoe.converters.compress.lowrank import Factors, apply_factors, factors_by_layer
from edgemoe.converters.compress.moe_view import dropped, moe_layers
from edgemoe.converters.errors import ConvertError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T) B^T * scale; B starts at zero, so training starts from the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / base.in_features ** 0.5)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T * self.scale

    def merged(self) -> torch.Tensor:
        return self.base.weight.detach() + (self.b @ self.a).detach() * self.scale


def lora_recover(hf_dir, drops: dict[int, tuple[int, ...]], low_rank: dict[tuple[int, int, str], Factors],
                 calib: list[list[int]], heldout: list[list[int]] | None, opts,
                 progress=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train on the calibration windows `calib` (token ids: the search's own), measure on `heldout`
    (None: no held-out record) -> (overrides: checkpoint tensor name -> merged weight, record)."""
    from transformers import AutoModelForCausalLM

    from edgemoe.converters.hf_checkpoint import HFCheckpoint

    torch.manual_seed(opts.seed)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    teacher = _logprobs(model, calib)
    held_ref = _logprobs(model, heldout) if heldout else None
    layers = moe_layers(model)
    per_layer = factors_by_layer(low_rank)
    for layer in layers:
        apply_factors(layer, per_layer.get(layer.index, {}))
    adapters = _attach(model, opts.lora_rank, opts.seed)
    record: dict = {"targets": list(TARGETS), "rank": opts.lora_rank, "steps": opts.lora_steps, "lr": opts.lora_lr,
                    "loss": "KL(original || compressed) on the calibration windows"}
    with dropped(layers, drops):
        record["kl_calibration_before"] = _quality(model, calib, teacher).mean_kl
        if held_ref is not None:
            record["heldout_before"] = _quality(model, heldout, held_ref).as_dict()
        _train(model, adapters, calib, teacher, opts, progress)
        record["kl_calibration_after"] = _quality(model, calib, teacher).mean_kl
        if held_ref is not None:
            record["heldout_after"] = _quality(model, heldout, held_ref).as_dict()
            record["heldout_tokens"] = sum(len(w) for w in heldout)
    ckpt = HFCheckpoint(hf_dir)
    overrides = {}
    for name, mod in adapters.items():
        key = name + ".weight"
        if not ckpt.has(key):
            raise ConvertError(f"LoRA: the checkpoint has no tensor {key!r} to merge the adapter into")
        overrides[key] = mod.merged()
    return overrides, record


def _attach(model, rank: int, seed: int) -> dict[str, LoRALinear]:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for name, mod in list(model.named_modules()):
        for child_name in TARGETS:
            child = getattr(mod, child_name, None)
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, 2.0 * rank, gen)
                setattr(mod, child_name, lora)
                adapters[f"{name}.{child_name}"] = lora
    if not adapters:
        raise ConvertError(f"LoRA: {type(model).__name__} has no attention projections named {', '.join(TARGETS)}")
    return adapters


def _train(model, adapters, calib, teacher, opts, progress) -> None:
    params = [p for a in adapters.values() for p in (a.a, a.b)]
    optim = torch.optim.AdamW(params, lr=opts.lora_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(opts.seed)
    for step in range(opts.lora_steps):
        i = int(torch.randint(len(calib), (1,), generator=gen))
        logp = torch.log_softmax(model(torch.tensor([calib[i]])).logits[0].float(), -1)
        loss = kl_rows(teacher[i][:-1], logp[:-1]).mean()  # the predicted positions, as every KL here
        optim.zero_grad()
        loss.backward()
        optim.step()
        if progress:
            progress("lora", step + 1, opts.lora_steps, f"KL {loss.item():.4f}")


@torch.no_grad()
def _logprobs(model, windows: list[list[int]]) -> list[torch.Tensor]:
    """Per window [T, V] float32 log-probabilities."""
    return [torch.log_softmax(model(torch.tensor([w])).logits[0].float(), -1) for w in windows]


@torch.no_grad()
def _quality(model, windows: list[list[int]], reference: list[torch.Tensor]) -> QualitySums:
    sums = QualitySums()
    for w, ref, logp in zip(windows, reference, _logprobs(model, windows)):
        sums.add(w, logp, ref)
    return sums
