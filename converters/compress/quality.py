"""Held-out quality of a compression decision, streamed layer by layer like the search: the
original and the compressed model run side by side through the engine's dense path, one
decoder layer's experts in memory at a time; at the end, perplexity, KL(original || compressed)
and top-1 agreement per token (converters/compress/evaluate.py's definitions)."""
from __future__ import annotations

import torch

from edgemoe.converters.compress.evaluate import Quality, compare
from edgemoe.converters.compress.lowrank import Factors, apply_factors, factors_by_layer
from edgemoe.converters.compress.stream import open_stream


@torch.no_grad()
def streamed_quality(conv, shape, drops: dict[int, tuple[int, ...]], low_rank: dict[tuple[int, int, str], Factors],
                     opts, progress) -> dict:
    """-> {"perplexity_original", "perplexity", "kl", "top1", "tokens", "source"}."""
    from edgemoe.converters.calib_text import CalibrationText
    from edgemoe.models.corpus import load_corpus

    text = CalibrationText(load_corpus().heldout, "demo corpus (held-out split)")
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
        ppl_ref, sums = [0.0, 0], [0.0, 0, 0.0, 0.0]
        for a, b, w in zip(s.bounds[:-1], s.bounds[1:], s.windows):
            tokens = torch.tensor(w)
            ref = torch.log_softmax(s.logits(x_ref[a:b]).float(), -1)
            got = torch.log_softmax(s.logits(x_cmp[a:b]).float(), -1)
            r = compare(tokens, ref, ref)
            ppl_ref = [ppl_ref[0] + r[0], ppl_ref[1] + r[1]]
            sums = [u + v for u, v in zip(sums, compare(tokens, ref, got))]
        n = int(s.bounds[-1])
    q = Quality.of(tuple(sums), n)
    return {"source": text.source, "tokens": n, "perplexity_original": float(torch.tensor(ppl_ref[0] / ppl_ref[1]).exp()),
            "perplexity": q.perplexity, "kl": q.kl, "top1": q.top1}
