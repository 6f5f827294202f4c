"""Train the demo MoE — the model `edgemoe chat` runs by default — on the demo corpus, on a CPU.

    python -m edgemoe.models.train_demo [--minutes 18] [--steps N] [--out DIR] [--seed 0]
                                        [--precision auto|f32|bf16]

Recipe: a 4-layer Mixtral (8 experts, top-2) with a 4096-token byte-level BPE trained on the train
split, AdamW + warmup + cosine decay, router load-balancing aux loss on, random 256-token windows
of the document stream. With `--minutes` the step count is first sized from a short speed
measurement, then re-planned against the clock while training, so the run fits the budget on a
busy shared machine; `--steps` fixes it instead, which makes a run exactly repeatable (same seed,
same steps -> same batches and updates). Writes a HF checkpoint + tokenizer + README.md to `--out`.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from edgemoe.models import demo_dir
from edgemoe.models.corpus import load_corpus
from edgemoe.models.demo_report import evaluate, greedy_samples, write_readme
from edgemoe.models.tokenizer import EOT, train_bpe

MAX_CHECKPOINT_F32_BYTES = 40_000_000  # above this the committed weights are stored as bf16
RESERVE_S = 90  # of the --minutes budget, kept for evaluation, samples and saving
REPLAN_EVERY = 10  # steps between re-estimates of how many steps fit before the deadline


@dataclass(frozen=True)
class DemoSpec:
    """Model and optimisation hyper-parameters. Hidden and expert ff are multiples of 256 so the
    GGUF K-quants (256-element super-blocks) apply to every matrix."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    context: int = 256
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.02
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0


def mixtral_config(spec: DemoSpec, eot_id: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_local_experts=spec.num_local_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        max_position_embeddings=spec.context,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        router_aux_loss_coef=spec.router_aux_loss_coef,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )


def build_model(spec: DemoSpec, eot_id: int, seed: int):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(mixtral_config(spec, eot_id))


def token_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """[N] int64: `<|endoftext|> doc <|endoftext|> doc ...` — every document starts after EOT, as a
    prompt does at inference (EOT is also the BOS token)."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, context] windows at uniformly random offsets of the stream."""
    starts = torch.randint(0, len(stream) - context, (batch,), generator=gen)
    return torch.stack([stream[s:s + context] for s in starts.tolist()])


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model, opt, x: torch.Tensor, bf16: bool, grad_clip: float) -> tuple[float, float]:
    """One AdamW update on x: [B, T]; returns (lm+aux loss, aux loss)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=x, labels=x, output_router_logits=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item(), out.aux_loss.item()


def make_optimizer(model, spec: DemoSpec) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms (1-D weights) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95),
    )


def measure_tps(spec: DemoSpec, eot_id: int, stream: torch.Tensor, steps: int = 4) -> dict[bool, float]:
    """Training tokens/s in f32 and in bf16 autocast, {bf16: tok/s}, on throw-away models.

    Steps alternate between the two so that load from other processes on a shared machine hits
    both alike; the first step of each (allocation) is not timed."""
    models = {bf16: build_model(spec, eot_id, seed=12345) for bf16 in (False, True)}
    opts = {bf16: make_optimizer(m, spec) for bf16, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    elapsed = {False: 0.0, True: 0.0}
    for i in range(steps + 1):
        for bf16 in (False, True):
            x = sample_batch(stream, spec.batch_size, spec.context, gen)
            start = time.perf_counter()
            train_step(models[bf16], opts[bf16], x, bf16, spec.grad_clip)
            elapsed[bf16] += (time.perf_counter() - start) if i > 0 else 0.0
    return {bf16: steps * spec.batch_size * spec.context / s for bf16, s in elapsed.items()}


def train(model, spec: DemoSpec, stream: torch.Tensor, bf16: bool, seed: int,
          steps: int | None, deadline: float | None, planned_steps: int) -> dict:
    """The training loop; returns the numbers the README records.

    With `steps` the schedule is fixed (a repeatable run). Otherwise the step count is re-planned
    every REPLAN_EVERY steps from the speed achieved so far, so the run ends at `deadline`
    (perf_counter seconds) however busy the machine is; the cosine follows the current plan."""
    opt = make_optimizer(model, spec)
    gen = torch.Generator().manual_seed(seed)
    total = steps or planned_steps
    model.train()
    start = time.perf_counter()
    recent: list[float] = []
    step = 0
    while step < total:
        lr = spec.lr * lr_factor(step, total, spec.warmup_steps, spec.min_lr_ratio)
        if step > spec.warmup_steps:
            lr = min(lr, opt.param_groups[0]["lr"])  # a re-plan that adds steps never raises it
        for group in opt.param_groups:
            group["lr"] = lr
        x = sample_batch(stream, spec.batch_size, spec.context, gen)  # [B, T]
        loss, aux = train_step(model, opt, x, bf16, spec.grad_clip)
        recent = (recent + [loss - spec.router_aux_loss_coef * aux])[-20:]
        step += 1
        now = time.perf_counter()
        if steps is None and step % REPLAN_EVERY == 0:
            s_per_step = (now - start) / step
            total = max(step + 1, step + int((deadline - now) / s_per_step))
        if step % 25 == 1 or step == total:
            print(f"step {step:5d}/{total}  lm loss {sum(recent) / len(recent):.3f}  aux {aux:.3f}  "
                  f"lr {lr:.2e}  {step * x.numel() / (now - start):.0f} tok/s", flush=True)
    model.eval()
    return {
        "steps": step,
        "train_s": time.perf_counter() - start,
        "final_train_loss": sum(recent) / len(recent),  # LM loss, mean of the last 20 steps
        "tokens_seen": step * spec.batch_size * spec.context,
    }


def train_demo(out: Path, minutes: float, seed: int = 0, steps: int | None = None,
               precision: str = "auto", spec: DemoSpec = DemoSpec()) -> dict:
    """Tokenizer, speed measurement, training, evaluation, checkpoint + README in `out`."""
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    out = Path(out)
    corpus = load_corpus()
    train_bpe(corpus.train, spec.vocab_size, out, model_max_length=spec.context)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eot_id = tok.token_to_id(EOT)
    train_ids, heldout_ids = token_stream(tok, corpus.train), token_stream(tok, corpus.heldout)
    print(f"corpus: {corpus.total_chars} chars; train {len(train_ids)} tokens, "
          f"held-out {len(heldout_ids)} tokens", flush=True)

    tps: dict[bool, float | None] = {False: None, True: None}  # measured only when needed
    if precision == "auto" or steps is None:
        tps = measure_tps(spec, eot_id, train_ids)
        print(f"measured: f32 {tps[False]:.0f} tok/s, bf16 autocast {tps[True]:.0f} tok/s", flush=True)
    bf16 = tps[True] > tps[False] if precision == "auto" else precision == "bf16"
    deadline = t0 + minutes * 60 - RESERVE_S
    planned = 0
    if steps is None:
        planned = int((deadline - time.perf_counter()) * tps[bf16] / (spec.batch_size * spec.context))

    model = build_model(spec, eot_id, seed)
    stats = train(model, spec, train_ids, bf16, seed, steps, deadline, max(REPLAN_EVERY, planned))
    save_checkpoint(model, out)

    from transformers import AutoModelForCausalLM

    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ppl, n_eval = evaluate(shipped, heldout_ids, spec.context)
    report = {
        **stats, "seed": seed, "bf16_autocast": bf16, "fixed_steps": steps is not None,
        "minutes": minutes,
        "measured_tps": {"f32": tps[False], "bf16": tps[True]},
        "heldout_ppl": ppl, "heldout_eval_tokens": n_eval,
        "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
        "corpus_chars": corpus.total_chars,
        "n_params": sum(p.numel() for p in shipped.parameters()),
        "samples": greedy_samples(shipped, out, ["The return value of", "def "]),
        "spec": asdict(spec),
    }
    report["wall_s"] = time.perf_counter() - t0
    write_readme(out, report)
    print(f"held-out perplexity {ppl:.2f} on {n_eval} tokens; wall {report['wall_s']:.0f} s", flush=True)
    return report


def save_checkpoint(model, out: Path) -> None:
    """config.json + model.safetensors (bf16 if f32 would be too large to commit) + generation config."""
    from transformers import GenerationConfig

    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    if n_bytes > MAX_CHECKPOINT_F32_BYTES:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    eot_id = model.config.eos_token_id
    GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
                     do_sample=False, max_new_tokens=128).save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=18.0, help="wall-time budget for the run")
    parser.add_argument("--steps", type=int, default=None, help="fix the step count (repeatable run)")
    parser.add_argument("--out", type=Path, default=demo_dir(), help="checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["auto", "f32", "bf16"], default="auto",
                        help="matmul precision while training (auto: the faster one, measured)")
    args = parser.parse_args(argv)
    from edgemoe.extras import missing_extra

    if message := missing_extra("train", "training the demo model"):
        raise SystemExit(f"error: {message}")
    train_demo(args.out, args.minutes, args.seed, args.steps, args.precision)


if __name__ == "__main__":
    main()
