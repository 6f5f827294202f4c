"""Calibration data: token windows of text, and the MoE blocks' inputs they produce."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from edgemoe.converters.compress.moe_view import MoELayer
from edgemoe.converters.errors import ConvertError


def calibration_texts(path: str | Path | None, split: str = "train") -> list[str]:
    """Texts from a .txt (blank-line separated) or .jsonl ({"text": ...}) file; default: the
    demo corpus split."""
    if path is None:
        from edgemoe.models.corpus import load_corpus

        corpus = load_corpus()
        return corpus.train if split == "train" else corpus.heldout
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"cannot read calibration file {path}: {exc}") from exc
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConvertError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
    else:
        texts = [t for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise ConvertError(f"calibration file {path} holds no text")
    return texts


def token_windows(tokenizer, texts: list[str], n_windows: int, length: int) -> torch.Tensor:
    """[n_windows, length] token ids cut from the concatenated texts (deterministic)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) >= n_windows * length:
            break
    if len(ids) < length:
        raise ConvertError(f"calibration text gives {len(ids)} tokens, fewer than one window of {length}")
    n = min(n_windows, len(ids) // length)
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.no_grad()
def moe_inputs(model, layers: list[MoELayer], windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """layer index -> the MoE block's input hidden states over all windows, [N, D]."""
    got: dict[int, list[torch.Tensor]] = {l.index: [] for l in layers}
    hooks = [l.block.register_forward_pre_hook(
        lambda mod, args, i=l.index: got[i].append(args[0].reshape(-1, args[0].shape[-1]).detach().clone()))
        for l in layers]
    try:
        for w in windows:
            model(w[None])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}
