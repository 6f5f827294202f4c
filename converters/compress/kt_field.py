"""Block-wise KT-reception field (MoE-I² §3.2): over blocks of T consecutive MoE layers, try
all K^T combinations of the per-layer genetic-search candidates and keep the combination whose
block output (the hidden state after the block's last layer) is closest to the unpruned model's.
Blocks are decided in order, each with the earlier blocks' choices applied."""
from __future__ import annotations

from itertools import product

import torch

from edgemoe.converters.compress.moe_view import MoELayer, dropped


@torch.no_grad()
def hidden_after(model, windows: torch.Tensor, layer_index: int) -> torch.Tensor:
    """Hidden states after decoder layer `layer_index` for every window: [n, T, D]."""
    outs = [model(w[None], output_hidden_states=True).hidden_states[layer_index + 1][0] for w in windows]
    return torch.stack(outs)


def kt_select(model, layers: list[MoELayer], windows: torch.Tensor,
              candidates: dict[int, list[tuple[int, ...]]], block: int, on_step=None) -> tuple[dict[int, tuple[int, ...]], list[dict]]:
    """-> chosen drops per layer index, and one log record per block."""
    if block < 1:
        raise ValueError(f"block size T must be >= 1, got {block}")
    chosen: dict[int, tuple[int, ...]] = {}
    log = []
    for start in range(0, len(layers), block):
        group = layers[start:start + block]
        end = group[-1].index
        reference = hidden_after(model, windows, end)
        best, best_err, tried = None, float("inf"), 0
        for combo in product(*(candidates[l.index] for l in group)):
            trial = dict(chosen) | {l.index: d for l, d in zip(group, combo)}
            with dropped(layers, trial):
                err = (hidden_after(model, windows, end) - reference).norm().item()
            tried += 1
            if err < best_err:
                best, best_err = combo, err
            if on_step:
                on_step()
        chosen |= {l.index: d for l, d in zip(group, best)}
        log.append({"layers": [l.index for l in group], "combinations": tried, "block_error": best_err,
                    "chosen": {l.index: list(d) for l, d in zip(group, best)}})
    return chosen, log
