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

    @staticmethod
    def of(sums: tuple[float, int, float, float], n_positions: int) -> "Quality":
        """From compare()'s sums; KL and top-1 are averaged over all n_positions."""
        nll, n_pred, kl, top1 = sums
        return Quality(float(torch.tensor(nll / n_pred).exp()), kl / n_positions, top1 / n_positions)


@torch.no_grad()
def reference_logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows])


@torch.no_grad()
def quality(model, windows: torch.Tensor, reference: torch.Tensor, layers: list[MoELayer] | None = None,
            drops: dict[int, tuple[int, ...]] | None = None) -> Quality:
    with dropped(layers or [], drops or {}):
        logp = torch.stack([torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows])
    return Quality.of(compare(windows, reference, logp), windows.numel())


def compare(tokens: torch.Tensor, reference: torch.Tensor, logp: torch.Tensor) -> tuple[float, int, float, float]:
    """Sums over one or more windows: (next-token NLL, predicted positions, KL(reference || logp),
    top-1 agreements). tokens [..., T], reference / logp [..., T, V] log-probabilities."""
    nll = -logp[..., :-1, :].gather(-1, tokens[..., 1:, None]).sum().item()
    kl = (reference.exp() * (reference - logp)).sum().item()
    top1 = (reference.argmax(-1) == logp.argmax(-1)).sum().item()
    return nll, tokens[..., 1:].numel(), kl, top1
