"""`edgemoe compress` settings, and every check on them that can be made before any work starts."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from edgemoe.converters.errors import ConvertError

METHODS = {"moe-i2": "moei2", "uniform": "uniform", "naee": "naee", "frequency": "frequency", "random": "random"}
SVD_MODES = ("whitened", "plain")
REPORT_SUFFIXES = (".json", ".yaml", ".yml")
# Each KT combination runs T decoder layers over the KT tokens; past this the field costs more
# than the genetic search it refines (the paper uses K = T = 3: 27).
MAX_KT_COMBINATIONS = 1024
MAX_NAEE_COMBINATIONS = 100_000  # C(E, n) per layer the exhaustive baseline may enumerate


class CompressError(ConvertError):
    """A compression setting that cannot work with this checkpoint."""


@dataclass(frozen=True)
class CompressOptions:
    prune: float = 0.25          # share of all routed experts to remove (0: skip stage 1)
    rank_ratio: float = 1.0      # share of expert parameters kept as low-rank factors (1: skip stage 2)
    svd: str = "plain"           # plain | whitened (activation-aware); plain measured better once factors are q8_0
    method: str = "moe-i2"       # which experts to drop: moe-i2 or a baseline
    population: int = 24
    generations: int = 10
    crossover: float = 1.0
    mutation: float = 0.2
    seed: int = 0
    keep_k: int = 3              # K candidates per layer kept by the genetic search
    block_t: int = 3             # T layers per KT-reception-field block
    calib: Path | None = None    # calibration text (.txt / .jsonl); None: the demo corpus's train split
    calib_tokens: int = 1024
    kt_tokens: int = 512         # of the calibration tokens, how many the KT field measures on
    window: int = 256
    lora_steps: int = 0
    lora_rank: int = 8
    lora_lr: float = 1e-3
    expert_type: str = "q8_0"
    dense_type: str = "f16"
    eval_tokens: int = 0         # held-out tokens for the final quality check (0: no check)
    n_threads: int | None = None

    @property
    def rank_multiple(self) -> int:
        """Ranks rounded to whole 32-value quant blocks for a quantized expert type, so a factor
        [out, r] is quantized like its expert instead of falling back to f16."""
        return 1 if self.expert_type.lower() in ("f32", "f16", "bf16") else 32

    @property
    def elite(self) -> int:
        return max(1, min(self.population - 1, self.population // 6))

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ModelShape:
    """What validation needs of the checkpoint: routed experts and top-k per MoE layer."""
    n_experts: dict[int, int]
    top_k: int
    n_layers: int


def check_options(o: CompressOptions) -> None:
    """Checks that need no checkpoint."""
    if not 0.0 <= o.prune < 1.0:
        raise CompressError(f"--prune {o.prune}: the share of experts to remove must be in [0, 1)")
    if not 0.0 < o.rank_ratio <= 1.0:
        raise CompressError(f"--rank-ratio {o.rank_ratio}: the share of expert parameters kept must be in (0, 1]; "
                            "1 skips the low-rank stage")
    if o.svd not in SVD_MODES:
        raise CompressError(f"--svd {o.svd!r}: choose one of {', '.join(SVD_MODES)}")
    if o.method not in METHODS:
        raise CompressError(f"--method {o.method!r}: choose one of {', '.join(METHODS)}")
    if o.population < 2 or o.generations < 1:
        raise CompressError(f"--population {o.population} --generations {o.generations}: the genetic search needs "
                            "a population of at least 2 and at least 1 generation")
    for name, p in (("crossover", o.crossover), ("mutation", o.mutation)):
        if not 0.0 <= p <= 1.0:
            raise CompressError(f"--{name} {p}: a probability must be in [0, 1]")
    if not 1 <= o.keep_k <= o.population:
        raise CompressError(f"--keep-k {o.keep_k}: K must be between 1 and the population ({o.population})")
    if o.block_t < 1:
        raise CompressError(f"--block-t {o.block_t}: T must be at least 1")
    if o.keep_k ** o.block_t > MAX_KT_COMBINATIONS:
        raise CompressError(f"--keep-k {o.keep_k} --block-t {o.block_t}: K^T = {o.keep_k ** o.block_t} combinations "
                            f"per block; the limit is {MAX_KT_COMBINATIONS} (K = T = 3 gives 27)")
    if o.calib_tokens < 64 or o.kt_tokens < 1 or o.window < 8:
        raise CompressError(f"--calib-tokens {o.calib_tokens}: at least 64 calibration tokens are needed")
    if o.lora_steps < 0 or o.lora_rank < 1 or o.lora_lr <= 0:
        raise CompressError(f"--lora-steps {o.lora_steps} --lora-rank {o.lora_rank}: steps must be >= 0, "
                            "rank >= 1 and the learning rate > 0")
    if o.lora_steps:
        from edgemoe.extras import missing_extra

        if message := missing_extra("train", f"--lora-steps {o.lora_steps} (the fine-tune runs the HF model)"):
            raise CompressError(message)
    if o.eval_tokens < 0:
        raise CompressError(f"--eval-tokens {o.eval_tokens} must be >= 0")
    if o.prune == 0 and o.rank_ratio == 1 and o.lora_steps == 0:
        raise CompressError("--prune 0 with --rank-ratio 1 and no LoRA leaves nothing to compress; "
                            "use `edgemoe convert` for a plain conversion")
    from edgemoe.converters.types import parse_output_type

    for flag, name in (("--type", o.expert_type), ("--dense-type", o.dense_type)):
        try:
            parse_output_type(name)
        except (ConvertError, ValueError, KeyError) as exc:
            raise CompressError(f"{flag} {name!r}: {exc}") from None


def check_against_model(o: CompressOptions, shape: ModelShape) -> None:
    """Checks that need the checkpoint's MoE layers."""
    n_moe = len(shape.n_experts)
    if o.block_t > n_moe:
        raise CompressError(f"--block-t {o.block_t}: the model has only {n_moe} MoE layers; T must be 1..{n_moe}")
    total = sum(shape.n_experts.values())
    cap = sum(n - shape.top_k for n in shape.n_experts.values())
    if round(o.prune * total) > cap:
        raise CompressError(f"--prune {o.prune}: removing {round(o.prune * total)} of {total} experts would leave "
                            f"fewer than top_k = {shape.top_k} experts in some layer; the most that can be pruned is "
                            f"{cap / total:.3f} ({cap} experts)")
    if o.method == "naee" and o.prune > 0:
        per_layer = max(shape.n_experts.values())
        worst = math.comb(per_layer, per_layer // 2)
        if worst > MAX_NAEE_COMBINATIONS:
            raise CompressError(f"--method naee enumerates up to C({per_layer}, {per_layer // 2}) = {worst} drop sets "
                                f"per layer (limit {MAX_NAEE_COMBINATIONS}); use moe-i2 for this many experts")


def check_report_path(path: Path | None, out: Path) -> None:
    if path is None:
        return
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise CompressError(f"--report {path}: give a .json or .yaml file name")
    if path.resolve() == out.resolve():
        raise CompressError(f"--report {path} is the output model's path; give another name")
