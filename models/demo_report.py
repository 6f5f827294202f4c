"""Evaluate the trained demo model and write its README (what was trained, how, how well).

Kept apart from the training loop so the numbers in models/demo/README.md come from the
checkpoint as shipped (reloaded from disk, bf16-stored weights included), not from the
in-memory training copy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

EVAL_BATCH = 8
SAMPLE_NEW_TOKENS = 40


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, context: int) -> tuple[float, int]:
    """Perplexity over non-overlapping `context`-token windows of `stream` (the held-out split,
    tail shorter than a window dropped). Each window predicts its last context-1 tokens, so the
    count returned is n_windows * (context - 1)."""
    n_windows = len(stream) // context
    windows = stream[: n_windows * context].view(n_windows, context)  # [W, T]
    nll_sum, n_tokens = 0.0, 0
    for batch in windows.split(EVAL_BATCH):
        logits = model(input_ids=batch).logits.float()  # [B, T, V]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += nll.item()
        n_tokens += batch[:, 1:].numel()
    return math.exp(nll_sum / n_tokens), n_tokens


@torch.no_grad()
def greedy_samples(model, tokenizer_dir: Path, prompts: list[str]) -> list[dict]:
    """Greedy continuations after `<|endoftext|>` + prompt, as a chat prompt would start."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = []
    for prompt in prompts:
        ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        out = model.generate(torch.tensor([ids]), max_new_tokens=SAMPLE_NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        samples.append({"prompt": prompt, "continuation": tok.decode(out[0, len(ids):])})
    return samples


def _tps(tokens_per_s: float | None) -> str:
    return "not measured" if tokens_per_s is None else f"{tokens_per_s:.0f} tok/s"


def _format_samples(samples: list[dict]) -> str:
    return "\n\n".join(
        f"Prompt `{s['prompt']!r}`, greedy, {SAMPLE_NEW_TOKENS} new tokens:\n\n"
        + "```text\n" + s["prompt"] + s["continuation"] + "\n```"
        for s in samples
    )


def write_readme(out: Path, report: dict) -> None:
    """models/demo/README.md plus the raw numbers as train_report.json."""
    spec = report["spec"]
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    command = (f"python -m edgemoe.models.train_demo --steps {report['steps']} --seed {report['seed']} "
               f"--precision {'bf16' if report['bf16_autocast'] else 'f32'}")
    schedule_note = (
        "The step count was fixed, so the same command repeats this run exactly."
        if report["fixed_steps"] else
        f"This run was `--minutes {report['minutes']:g}`: it re-planned its step count against the "
        "clock while training (the cosine schedule follows the plan), and stopped after the steps "
        "above; the command runs the same recipe with the schedule fixed at that step count, "
        "repeatable exactly.")
    text = f"""# edgemoe demo MoE

The default model of `edgemoe chat`: a small Mixtral (`MixtralForCausalLM`) trained from scratch
on a CPU on text every Python install carries (stdlib docstrings + pydoc topics,
`edgemoe.models.corpus`). It writes docstring-flavoured English and Python; it is a demo of
expert routing and caching, not a useful assistant.

| | |
|---|---|
| layers / hidden / heads (kv) | {spec['num_hidden_layers']} / {spec['hidden_size']} / {spec['num_attention_heads']} ({spec['num_key_value_heads']}) |
| experts / top-k / expert ff | {spec['num_local_experts']} / {spec['num_experts_per_tok']} / {spec['intermediate_size']} |
| vocab | {spec['vocab_size']} byte-level BPE (GPT-2 pre-tokenizer), `<\\|endoftext\\|>` = BOS = EOS |
| context / rope theta | {spec['context']} / {spec['rope_theta']:g} |
| parameters | {report['n_params']:,} ({size_mb:.1f} MB safetensors) |

## Training

Reproduce:

    {command}

{schedule_note}

- corpus: {report['corpus_chars']:,} characters; train split {report['train_tokens']:,} tokens,
  held-out split {report['heldout_tokens']:,} tokens (5% of documents, hash split)
- {report['steps']} steps x {spec['batch_size']} x {spec['context']} tokens = {report['tokens_seen']:,} tokens seen
  ({report['tokens_seen'] / report['train_tokens']:.1f} epochs); AdamW lr {spec['lr']:g}, betas (0.9, 0.95),
  weight decay {spec['weight_decay']}, {spec['warmup_steps']} warmup steps, cosine to {spec['min_lr_ratio']:g}x;
  router aux loss coef {spec['router_aux_loss_coef']}; bf16 autocast: {report['bf16_autocast']}
  (short speed check before training: f32 {_tps(report['measured_tps']['f32'])}, bf16 {_tps(report['measured_tps']['bf16'])})
- 2 CPU threads; training {report['train_s'] / 60:.1f} min, whole run {report['wall_s'] / 60:.1f} min wall
  (machine shared with other work)
- final train LM loss (mean of last 20 steps): {report['final_train_loss']:.3f}

## Evaluation

Held-out perplexity **{report['heldout_ppl']:.2f}** on {report['heldout_eval_tokens']:,} predicted tokens
(the held-out stream cut into non-overlapping {spec['context']}-token windows; the checkpoint as
stored, reloaded with transformers in f32).

## Samples

{_format_samples(report['samples'])}
"""
    (out / "README.md").write_text(text)
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
