"""Quality of a pruned model against the original, on held-out windows: perplexity, KL
divergence of next-token distributions (original || pruned), top-1 agreement."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgemoe.converters.compress.moe_view import MoELayer, dropped


@dataclass(frozen=True)
class Quality:
    perplexity: float
    kl: float          # mean per-token KL(original || model), nats
    top1: float        # share of positions where the argmax agrees with the original


@torch.no_grad()
def reference_logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows])


@torch.no_grad()
def quality(model, windows: torch.Tensor, reference: torch.Tensor, layers: list[MoELayer] | None = None,
            drops: dict[int, tuple[int, ...]] | None = None) -> Quality:
    with dropped(layers or [], drops or {}):
        logp = torch.stack([torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows])
    targets = windows[:, 1:]
    nll = -logp[:, :-1].gather(-1, targets[..., None]).mean().item()
    kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
    top1 = (reference.argmax(-1) == logp.argmax(-1)).float().mean().item()
    return Quality(float(torch.tensor(nll).exp()), kl, top1)
