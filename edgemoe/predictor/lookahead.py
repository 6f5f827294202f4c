"""Router look-ahead: the routers of this and the next few MoE layers applied to this layer's
MoE input. Row 0 is the layer's own router logits; row r>0 is "router speculation" for the
layer r steps ahead (hidden states change little between adjacent layers). One small matmul
per layer: the prefetcher computes it at prefetch time, traces record it for the simulator
and for training the learned predictor."""
from __future__ import annotations

import torch

AHEAD = 3  # layers ahead the look-ahead (and the learned predictor) reaches
PAD_LOGIT = -1e4  # experts a (pruned) layer does not have: never in a top-k, ~0 after softmax


class RouterLookahead:
    def __init__(self, blocks, width: int | None = None, ahead: int = AHEAD):
        """width: experts per row (default: the largest router); layers with fewer experts are
        padded with PAD_LOGIT."""
        self.width = width or max((b.router.shape[0] for b in blocks), default=0)
        self.stacks, self.bias = [], []  # per block index: [R*width, D] routers, [R*width] padding
        for i in range(len(blocks)):
            routers = [b.router for b in blocks[i:i + ahead + 1]]
            self.stacks.append(torch.cat([torch.nn.functional.pad(r, (0, 0, 0, self.width - r.shape[0]))
                                          for r in routers]))
            self.bias.append(torch.cat([torch.arange(self.width) >= r.shape[0] for r in routers]) * PAD_LOGIT)

    def rows(self, index: int, x_last: torch.Tensor) -> torch.Tensor:
        """x_last: [D] MoE input of block `index` -> logits [R, width] (R = rows that exist)."""
        return (self.stacks[index] @ x_last + self.bias[index]).view(-1, self.width)
