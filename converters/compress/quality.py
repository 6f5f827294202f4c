"""Held-out quality of a compression decision, streamed layer by layer like the search: the
original and the compressed model run side by side through the engine's dense path, one
decoder layer's experts in memory at a time; at the end, perplexity, KL(original || compressed)
and top-1 agreement, averaged over the predicted positions (edgemoe.bench.quality.QualitySums:
the one implementation, and its convention)."""
from __future__ import annotations

import torch

from edgemoe.bench.quality import QualitySums
from edgemoe.converters.compress.lowrank import Factors, apply_factors, factors_by_layer
from edgemoe.converters.compress.stream import open_stream


def heldout_text():
    """What every held-out measurement of compression runs on: the demo corpus's held-out split."""
    from edgemoe.converters.calib_text import CalibrationText
    from edgemoe.models.corpus import load_corpus

    return CalibrationText(load_corpus().heldout, "demo corpus (held-out split)")


@torch.no_grad()
def streamed_quality(conv, drops: dict[int, tuple[int, ...]], low_rank: dict[tuple[int, int, str], Factors],
                     opts, progress) -> dict:
    """-> {"perplexity_original", "perplexity", "kl", "top1", "positions", "tokens", "source"}."""
    text = heldout_text()
    with open_stream(conv, text, opts.eval_tokens, opts.window, opts.n_threads) as s:
        x_ref = s.embed()
        x_cmp = x_ref.clone()
        moe_ids = s.moe_indices()
        per_layer = factors_by_layer(low_rank)
        for i in range(s.n_layers):
            x_ref, x_cmp = s.attention(i, x_ref), s.attention(i, x_cmp)
            xr, xc = s.ffn_input(i, x_ref), s.ffn_input(i, x_cmp)
            moe = s.load_moe(i) if i in moe_ids else None
            x_ref += s.ffn(i, xr, moe)
            if moe is not None:
                apply_factors(moe, per_layer.get(i, {}))
            x_cmp += s.ffn(i, xc, moe, drops.get(i, ()))
            del moe
            progress("eval", i + 1, s.n_layers, f"layer {i}")
        sums = QualitySums()
        for a, b, w in zip(s.bounds[:-1], s.bounds[1:], s.windows):
            sums.add(w, s.logits(x_cmp[a:b]), s.logits(x_ref[a:b]))
        n = int(s.bounds[-1])
    return {"source": text.source, "tokens": n, **sums.as_dict()}
