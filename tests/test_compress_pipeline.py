"""`edgemoe compress` end to end on a tiny seeded Mixtral: every invalid setting is refused with
one clear line before any work starts; a full run (importance, genetic search, KT field, SVD,
export) writes a file and a report that agree with each other; the engine's logits on that file
match transformers running the same decisions; seeded runs repeat; Ctrl-C leaves nothing."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml

from edgemoe.cli import main as cli_main
from edgemoe.converters.compress.options import MAX_KT_COMBINATIONS, CompressError, CompressOptions
from edgemoe.converters.compress.pipeline import compress, prepare
from edgemoe.gguf_file import GGUFFile
from edgemoe.layout import KEY_COMPRESS_REPORT, read_layout
from oracles import rel_max_diff

# small search settings: the run takes seconds on one thread
SMALL = CompressOptions(prune=0.25, rank_ratio=0.7, population=6, generations=2, keep_k=2, block_t=2,
                        calib_tokens=256, kt_tokens=128, window=64, expert_type="f32", dense_type="f32", n_threads=1)
PROMPT_IDS = [3 + (37 * i + 11) % 500 for i in range(24)]
REL_TOL_F32 = 1e-5


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.fixture(scope="module")
def run(ckpt, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("compress") / "c.gguf"
        stages = set()
        result = compress(prepare(ckpt, out, replace(SMALL, eval_tokens=128), out.with_suffix(".yaml")),
                          lambda stage, done, total, label: stages.add(stage), out.with_suffix(".yaml"))
        return result, stages
    finally:
        torch.set_num_threads(threads)


INVALID = [
    (dict(prune=0.9), "fewer than top_k = 2"),
    (dict(prune=1.0), r"must be in \[0, 1\)"),
    (dict(rank_ratio=0.0), r"must be in \(0, 1\]"),
    (dict(rank_ratio=1.5), r"must be in \(0, 1\]"),
    (dict(keep_k=0), "K must be between 1"),
    (dict(keep_k=7, population=6), "K must be between 1 and the population"),
    (dict(block_t=0), "T must be at least 1"),
    (dict(block_t=4), "only 3 MoE layers"),
    (dict(keep_k=11, block_t=3, population=20), f"the limit is {MAX_KT_COMBINATIONS}"),
    (dict(method="magic"), "choose one of moe-i2"),
    (dict(svd="qr"), "choose one of whitened"),
    (dict(crossover=1.5), "probability"),
    (dict(population=1), "population of at least 2"),
    (dict(prune=0.0, rank_ratio=1.0), "nothing to compress"),
    (dict(expert_type="q9"), "unknown output type"),
]


@pytest.mark.parametrize("change,message", INVALID, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(INVALID)])
def test_invalid_settings_are_refused_before_any_work(ckpt, tmp_path, change, message):
    with pytest.raises(CompressError, match=message):
        prepare(ckpt, tmp_path / "c.gguf", replace(SMALL, **change))
    assert not any(tmp_path.iterdir())


def test_bad_inputs_are_refused_before_any_work(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [((tmp_path / "nope", tmp_path / "c.gguf", SMALL), "is not a folder"),
             ((ckpt, tmp_path / "c.gguf", replace(SMALL, calib=empty)), "holds no text"),
             ((ckpt, tmp_path / "c.gguf", replace(SMALL, calib=tmp_path / "missing.txt")), "does not exist"),
             ((ckpt, tmp_path / "no-dir" / "c.gguf", SMALL), "does not exist")]
    for args, message in cases:
        with pytest.raises(Exception, match=message):
            prepare(*args)
    with pytest.raises(CompressError, match="json or .yaml"):
        prepare(ckpt, tmp_path / "c.gguf", SMALL, tmp_path / "r.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_cli_error_is_one_line_and_exit_code_2(ckpt, tmp_path, capsys):
    code = cli_main(["compress", str(ckpt), "-o", str(tmp_path / "c.gguf"), "--prune", "0.9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("edgemoe compress: error: --prune 0.9") and "top_k" in err
    assert not any(tmp_path.iterdir())


def test_report_agrees_with_itself_and_the_file(run):
    result, stages = run
    r = yaml.safe_load(result.path.with_suffix(".yaml").read_text())
    assert stages >= {"importance", "search", "kt field", "svd", "eval", "export"}
    layout = read_layout(GGUFFile(result.path))
    layers = r["layers"]
    assert sorted(layers) == [0, 1, 2]
    assert sum(l["drop_count"] for l in layers.values()) == round(0.25 * 24)
    for i, rec in layers.items():
        assert sorted(rec["kept"] + rec["dropped"]) == list(range(8))
        assert rec["kept_count"] == len(rec["kept"]) >= 2 and len(rec["dropped"]) == rec["drop_count"]
        assert list(layout.expert_ids[i]) == rec["kept"] == result.model.kept[i]
        assert len(rec["importance"]) == 8 and rec["layer_importance"] == pytest.approx(sum(rec["importance"]))
        errors = [c["error"] for c in rec["candidates"]]
        assert errors == sorted(errors) and len(errors) <= SMALL.keep_k
        assert set(rec["ranks"]) == set(rec["kept"])
        for slot, e in enumerate(rec["kept"]):
            ranks = rec["ranks"][e]
            assert layout.expert_ranks[(i, slot)] == (ranks["gate"], ranks["up"], ranks["down"])
            assert all(0 < v < 1 for v in rec["svd_relative_error"][e].values())
    chosen = {int(l): d for b in r["blocks"] for l, d in b["chosen"].items()}
    assert chosen == {i: rec["dropped"] for i, rec in layers.items()}
    assert [b["layers"] for b in r["blocks"]] == [[0, 1], [2]]
    assert all(b["combinations"] == SMALL.keep_k ** len(b["layers"]) for b in r["blocks"])
    s = r["summary"]
    assert s["experts_after"] == 18 and s["file_bytes"] == result.path.stat().st_size
    assert 0 < s["expert_param_share"] < 0.75
    q = r["quality"]
    assert q["tokens"] == 128 and q["kl"] > 0 and 0 < q["top1"] <= 1
    stored = json.loads(GGUFFile(result.path).field(KEY_COMPRESS_REPORT))
    assert stored["summary"]["experts_after"] == 18 and stored["options"]["prune"] == 0.25


def torch_reference_logits(ckpt, compressed) -> "np.ndarray":
    """transformers running the compressed model's decisions: dropped experts masked out of the
    router, low-rank matrices replaced by a @ b."""
    from transformers import AutoModelForCausalLM

    from edgemoe.converters.compress.lowrank import apply_factors
    from edgemoe.converters.compress.moe_view import dropped, moe_layers

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    layers = moe_layers(model)
    per_layer: dict[int, dict[int, dict]] = {}
    for (l, e, role), f in compressed.low_rank.items():
        per_layer.setdefault(l, {}).setdefault(e, {})[role] = f
    for layer in layers:
        apply_factors(layer, per_layer.get(layer.index, {}))
    drops = {l.index: tuple(e for e in range(l.n_experts) if e not in compressed.kept.get(l.index, range(l.n_experts)))
             for l in layers}
    with dropped(layers, drops), torch.no_grad():
        return model(torch.tensor([PROMPT_IDS])).logits[0].numpy()


def engine_logits(path):
    from edgemoe.engine import Engine, EngineConfig

    engine = Engine(path, EngineConfig(kv_type="f32"))  # f32 attention, as the torch reference's
    try:
        return engine.logits(PROMPT_IDS)
    finally:
        engine.close()


def test_engine_logits_match_the_torch_reference(run, ckpt, one_torch_thread):
    result, _ = run
    assert rel_max_diff(engine_logits(result.path), torch_reference_logits(ckpt, result.model)) < REL_TOL_F32


@pytest.mark.parametrize("arch", ["qwen2moe", "deepseek2"])  # shared experts; DeepSeek's leading dense layer
def test_other_architectures_compress_and_match(arch, tiny_checkpoint, tmp_path, one_torch_thread):
    ckpt = tiny_checkpoint(arch)
    opts = replace(SMALL, calib_tokens=128, kt_tokens=64, block_t=1)
    result = compress(prepare(ckpt, tmp_path / "c.gguf", opts))
    assert sum(l["drop_count"] for l in result.report["layers"].values()) == round(0.25 * 8 * len(result.report["layers"]))
    assert rel_max_diff(engine_logits(result.path), torch_reference_logits(ckpt, result.model)) < REL_TOL_F32


def test_seeded_runs_repeat(ckpt, tmp_path, one_torch_thread):
    opts = replace(SMALL, rank_ratio=1.0, prune=0.5, method="uniform", population=4, generations=3, keep_k=1,
                   block_t=1, calib_tokens=128, kt_tokens=64)
    reports = [compress(prepare(ckpt, tmp_path / f"{n}.gguf", replace(opts, seed=seed))).report
               for n, seed in enumerate((3, 3))]
    strip = lambda r: {k: r[k] for k in ("layers", "blocks")}  # noqa: E731
    assert strip(reports[0]) == strip(reports[1])
    assert (tmp_path / "0.gguf").read_bytes() == (tmp_path / "1.gguf").read_bytes()


def test_interrupt_leaves_no_partial_output(ckpt, tmp_path, one_torch_thread):
    def stop(stage, done, total, label):
        if stage == "export" and done > 0:
            raise KeyboardInterrupt

    opts = replace(SMALL, rank_ratio=1.0, calib_tokens=128, kt_tokens=64, keep_k=1, block_t=1)
    with pytest.raises(KeyboardInterrupt):
        compress(prepare(ckpt, tmp_path / "c.gguf", opts, tmp_path / "c.json"), stop, tmp_path / "c.json")
    assert not any(tmp_path.iterdir())


def test_lora_recovery_is_merged_into_attention_overrides(ckpt, tmp_path, one_torch_thread):
    from edgemoe.converters.hf_checkpoint import HFCheckpoint

    opts = replace(SMALL, rank_ratio=1.0, prune=0.5, calib_tokens=128, kt_tokens=64, keep_k=1, block_t=1,
                   lora_steps=4, lora_rank=4, lora_lr=3e-3)
    result = compress(prepare(ckpt, tmp_path / "c.gguf", opts))
    lr = result.report["lora"]
    assert lr["kl_calibration_after"] < lr["kl_calibration_before"]
    overrides = result.model.overrides
    assert len(overrides) == 3 * 4 and all(k.endswith(("q_proj.weight", "v_proj.weight", "k_proj.weight",
                                                         "o_proj.weight")) for k in overrides)
    original = HFCheckpoint(ckpt)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(overrides[name], torch.from_numpy(original.load(name)))


def test_ranks_round_to_quant_blocks_for_quantized_experts():
    from edgemoe.converters.compress.lowrank import ranks_from_importance

    imp = torch.tensor([1.0, 5.0, 50.0, 500.0])
    plain = ranks_from_importance(imp, 512, 256, 0.5)
    blocks = ranks_from_importance(imp, 512, 256, 0.5, multiple=32)
    assert all(r % 32 == 0 and r >= 32 for r in blocks) and blocks == sorted(blocks)
    assert abs(sum(blocks) - sum(plain)) <= 16 * len(imp)
    assert replace(SMALL, expert_type="q8_0").rank_multiple == 32 and SMALL.rank_multiple == 1
