"""The `edgemoe` command. Each subcommand parses its arguments and calls one plain function."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgemoe import commands
from edgemoe.commands import convert, generate, measure, serve, trace, tune
from edgemoe.policies import DEFAULT_POLICY, POLICIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe",
        description="Run big Mixture-of-Experts language models on a laptop.",
        epilog="Run `edgemoe COMMAND --help` for each command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint to GGUF",
                       description="Convert a Hugging Face MoE checkpoint folder (config.json, *.safetensors, "
                                   "tokenizer files) to a GGUF file in llama.cpp's stock layout. Tensors are "
                                   "streamed one at a time, so a model larger than RAM converts too.")
    c.add_argument("hf_dir", type=Path, help="checkpoint folder")
    c.add_argument("-o", "--output", type=Path, required=True, help="output .gguf path (written atomically)")
    c.add_argument("--type", default=None,
                   help="tensor type: f32, f16, bf16, q8_0, q4_0, q2_k, q3_k, q4_k, q5_k, q6_k (default f16; with "
                        "--mixed the dense tensors' type, default q8_0); norms and routers stay f32, rows that do "
                        "not fit a K-quant block fall back")
    c.add_argument("--mixed", action="store_true",
                   help="per-expert mixed precision: calibrate, then give each expert (or each layer, --mixed-per) "
                        "the type (q2_k..q8_0, --mixed-types) that minimises expected output error within "
                        "--expert-bytes / --avg-bits; writes edgemoe's "
                        "extended layout (runs in the edgemoe engine, not in stock llama.cpp)")
    c.add_argument("--expert-bytes", default=None, help="with --mixed: bytes for all experts (1.5GB, 800MiB)")
    c.add_argument("--avg-bits", type=float, default=None, help="with --mixed: average bits per expert weight (3.5)")
    c.add_argument("--calibration", type=Path, default=None,
                   help="with --mixed: calibration text (.txt, or .jsonl of strings / {\"text\": ...}); "
                        "default: the demo corpus's train split")
    c.add_argument("--calibration-tokens", type=int, default=8192, help="with --mixed: tokens to calibrate on")
    c.add_argument("--imatrix", choices=["auto", "always", "never"], default="never",
                   help="with --mixed: quantize experts with their importance matrices never (default: on the demo "
                        "model it did not lower held-out KL), always, or where calibration measured it better (auto)")
    c.add_argument("--mixed-types", default=None, metavar="TYPES",
                   help="with --mixed: the expert types to choose from, comma-separated (default "
                        "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0), or 'repacked': those ggml's CPU backend on this machine "
                        "multiplies repacked (q4_k, and q2_k on AVX-512), the faster kernels when every expert fits")
    c.add_argument("--mixed-per", choices=["expert", "layer"], default="expert",
                   help="with --mixed: choose a type per expert (default, least error for the bytes) or per layer "
                        "(every expert of a layer in one type: the engine then decodes a token as one graph when "
                        "the budget holds every expert, instead of layer by layer)")
    c.set_defaults(func=convert.convert_cmd)

    _compress_parser(sub)

    i = sub.add_parser("inspect", help="show what a GGUF file holds",
                       description="Architecture, layers, experts per layer, tensor types, expert vs dense "
                                   "bytes, and whether stock llama.cpp can load the file.")
    i.add_argument("model", type=Path, help=".gguf file")
    i.set_defaults(func=convert.inspect_cmd)

    up = sub.add_parser("upgrade", help="rewrite an old per-expert Mixtral GGUF in the current layout",
                        description="GGUF files from llama.cpp's converters before April 2024 store each expert "
                                    "as its own tensors (blk.N.ffn_gate.E.weight); llama.cpp 0.3.36 and the edgemoe "
                                    "engine read 3-D expert tensors (blk.N.ffn_gate_exps.weight). This rewrites such "
                                    "a file byte for byte (nothing is re-quantized), atomically.")
    up.add_argument("model", type=Path, help="the per-expert .gguf file")
    up.add_argument("-o", "--output", type=Path, required=True, help="output .gguf path")
    up.set_defaults(func=convert.upgrade_cmd)

    e = sub.add_parser("eval", help="perplexity, KL divergence and top-1 agreement against a reference GGUF",
                       description="Run each model and the reference through the edgemoe engine on held-out "
                                   "windows (default: the demo corpus's held-out split) and report perplexity, "
                                   "KL(reference || model) per token, top-1 agreement and expert bytes.")
    e.add_argument("models", type=Path, nargs="+", help=".gguf files to evaluate")
    e.add_argument("--reference", type=Path, required=True, help="reference .gguf (e.g. the f32 conversion)")
    e.add_argument("--text", type=Path, default=None, help="evaluation text (.txt or .jsonl) instead of the demo's")
    e.add_argument("--windows", type=int, default=None, help="at most this many 256-token windows")
    e.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    e.set_defaults(func=measure.eval_cmd)

    g = sub.add_parser("generate", help="generate text from a GGUF model",
                       description="Stream a continuation of a prompt. Without MODEL, the embedded demo model "
                                   "(a small MoE trained on Python's own documentation) is used.")
    g.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    g.add_argument("-p", "--prompt", default="The os module provides", help="prompt text")
    g.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", choices=["edgemoe", "llama"], default="edgemoe",
                   help="edgemoe: our engine with the budgeted expert cache (default); "
                        "llama: llama.cpp through llama-cpp-python, stock, or with --budget/--max-memory our expert "
                        "cache deciding which experts are resident (--policy, --prefetch, --predictor apply)")
    _engine_options(g)
    g.add_argument("--predictor", default=None, metavar="NAME|FILE.onnx",
                   help="prefetch with this predictor (implies --prefetch): cooccur (the next layer's experts from "
                        "this token's previous layers, counted online; the --prefetch default), router (next-layer "
                        "router speculation), prior (routing frequencies), none, learned (the .onnx beside the "
                        "model or embedded in it), or a FILE.onnx from `edgemoe predictor train`")
    g.add_argument("--stats", action="store_true", help="print cache statistics per token to stderr")
    g.set_defaults(func=generate.generate_cmd)

    ch = sub.add_parser("chat", help="chat in the terminal, with live expert-cache statistics",
                        description="A terminal chat (Textual) next to live statistics: tokens/s, hit rate "
                                    "overall and per layer, a layers x experts residency/heat map, bytes loaded "
                                    "per token, prefetch accuracy, resident bytes vs budget, peak RSS. Budget and "
                                    "policy change while it runs (F3, F5/F6/F7). Without MODEL, the embedded demo "
                                    "model. F1 in the app lists the keys.")
    ch.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    ch.add_argument("--backend", choices=["edgemoe", "llama"], default="edgemoe",
                    help="edgemoe: our engine with the budgeted expert cache (default); "
                         "llama: stock llama.cpp (statistics: speed, routing heat, peak RSS), or with "
                         "--budget/--max-memory llama.cpp computing under our expert cache (all statistics)")
    ch.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy (default 0.7)")
    ch.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    ch.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens per reply (default 128)")
    ch.add_argument("--seed", type=int, default=0)
    _engine_options(ch)
    ch.set_defaults(func=generate.chat_cmd)
    _serve_parser(sub)

    t = sub.add_parser("trace", help="record a routing trace (experts chosen per token and layer)",
                       description="Generate from each prompt with the edgemoe engine and record which experts "
                                   "every token chose in every MoE layer, for `edgemoe simulate`.")
    t.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    t.add_argument("-p", "--prompt", action="append", help="prompt (repeatable)")
    t.add_argument("--prompts", type=Path, help="text file, one prompt per line")
    t.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    t.add_argument("-o", "--output", type=Path, required=True, help="trace file to write (JSON)")
    t.add_argument("--backend", choices=["edgemoe", "llama"], default="edgemoe",
                   help="engine that runs the prompts (llama: read from llama.cpp's ffn_moe_topk tensors)")
    t.add_argument("--no-router-logits", action="store_true",
                   help="leave out the router look-ahead logits (edgemoe backend; they let `simulate "
                        "--compare-predictors` score router speculation, and make the file ~10x larger)")
    t.set_defaults(func=trace.trace_cmd)

    s = sub.add_parser("simulate", help="replay routing traces through every cache policy and budget",
                       description="Hit rates, misses and bytes read per token of each policy (split, lru, lfu, "
                                   "hybrid, random) next to Belady's offline optimum, without running the model. "
                                   "Given a folder, every trace in it, then the sum over them (overall).")
    s.add_argument("trace", type=Path, help="trace file from `edgemoe trace`, or a folder of them")
    s.add_argument("--budget", action="append",
                   help="expert budget: bytes (2GB, 512MiB) or a share of all experts (50%%); repeatable "
                        "(default: 25%%, 50%%, 75%%)")
    s.add_argument("--policy", action="append", help="policy to replay (repeatable; default: all)")
    s.add_argument("--compare-predictors", action="store_true",
                   help="instead of policies: replay each prefetch predictor (none, router, prior, cooccur, "
                        "learned) with the first --policy (default split): precision/recall, hit rate vs Belady, "
                        "wasted bytes")
    s.add_argument("--predictor", type=Path, default=None, metavar="FILE.onnx",
                   help="the learned predictor to compare (implies --compare-predictors)")
    s.add_argument("--score-from", type=int, default=0, metavar="STEP",
                   help="replay every step but count only steps STEP and later (e.g. those a predictor was not "
                        "trained on; default 0)")
    s.set_defaults(func=trace.simulate_cmd)
    b = sub.add_parser("bench", help="edgemoe vs llama.cpp tokens/s on the same GGUF, at several budgets",
                       description="Prefill and decode tokens/s of llama.cpp and of the edgemoe engine at full "
                                   "expert budget and at smaller shares, measured side by side in one run; hit "
                                   "rate vs Belady; ms per token by part. Default models: the demo model and a "
                                   "Mixtral-shaped slice (true Mixtral dims, random Q4_K weights, built once).")
    b.add_argument("models", type=Path, nargs="*", help=".gguf files (default: demo + Mixtral slice)")
    b.add_argument("--slice-layers", type=int, default=None,
                   help="layers of the Mixtral-shaped slice (default 2; 8 with --max-memory)")
    b.add_argument("--no-slice", action="store_true", help="skip the Mixtral-shaped slice")
    b.add_argument("--budgets", default="100,75,50,25", help="expert budgets in %% of all expert bytes")
    b.add_argument("-n", "--tokens", type=int, default=32, help="decode tokens per run (default 32)")
    b.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for prefill (default 64)")
    b.add_argument("--policy", default=DEFAULT_POLICY)
    b.add_argument("--prefetch", action="store_true")
    b.add_argument("--predictor", default=None, metavar="NAME|FILE.onnx",
                   help="with --max-memory: the managed runs prefetch with this predictor (implies --prefetch; "
                        "names as generate --predictor: cooccur, router, prior, none, learned, or a FILE.onnx)")
    b.add_argument("--threads", type=int, default=None, help="threads for both backends (default: all cores)")
    b.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    b.add_argument("--kv-type", default="f16", choices=("f16", "f32", "q8_0"),
                   help="the engine's KV cache type (default f16; llama.cpp runs its default, f16)")
    b.add_argument("--max-memory", default=None, metavar="CAP",
                   help="memory-capped benchmark: run every backend configuration (llama.cpp defaults, no repack, "
                        "no repack + lazy; the edgemoe engine; llama.cpp with edgemoe's expert cache) in a fresh "
                        "process inside its own memory cgroup "
                        "capped at CAP (e.g. 3GiB), the model file's page cache dropped before each run; prints "
                        "decode tok/s, peak cgroup memory, OOM kills, bytes read per token, the ratio against the "
                        "best plain llama.cpp run and the bound (bytes/token / probed bandwidth + compute/token). "
                        "Needs a writable cgroup (root). Default models: the 8-layer Mixtral slice and the "
                        "Qwen3-30B-A3B-shaped slice (built once)")
    b.add_argument("--budget", default=None,
                   help="with --max-memory: expert budget in bytes for the managed runs (default: each picks the "
                        "largest its memory plan fits under the cap, as generate --max-memory does)")
    b.add_argument("--runs", default=None,
                   help="with --max-memory: comma-separated subset of llama, llama-norepack, llama-lazy, edgemoe, "
                        "llama-budget (default: all)")
    b.add_argument("--no-reference", action="store_true",
                   help="with --max-memory: skip the warm, uncapped llama.cpp run that measures compute per token "
                        "(no bound is printed then)")
    b.add_argument("--cgroup-root", type=Path, default=None,
                   help="with --max-memory: cgroup folder to make the groups in (default: below this process's own "
                        "memory cgroup, v2 if its memory controller is there, else v1)")
    b.set_defaults(func=measure.bench_cmd)

    tu = sub.add_parser("tune", help="find the expert budget, policy and prefetch setting that run fastest under a "
                                     "memory cap, and write a profile for generate/chat",
                        description="Measure the machine, record a routing trace on the prompts, replay it through "
                                    "every budget x policy x prefetch setting, predict tokens/s with a cost model "
                                    "calibrated by real runs, confirm the best few with real runs, and write "
                                    "profile.yaml (for --profile), tune.png and tune.json to --out. Ctrl-C keeps what "
                                    "was gathered.")
    tu.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    tu.add_argument("--prompts", type=Path, default=None, help="text file, one prompt per line (default: 3 built in)")
    tu.add_argument("--max-memory", default=None,
                    help="cap on the process's memory, e.g. 12GB or 900MiB (default: RAM available now)")
    tu.add_argument("-n", "--tokens", type=int, default=32, help="tokens generated per prompt and run (default 32)")
    tu.add_argument("--budgets", default=None,
                    help="expert budgets in %% of all expert bytes (default 100,87.5,75,...,12.5; the largest "
                         "budget under the cap is added)")
    tu.add_argument("--confirm", default="3",
                    help="settings confirmed by real runs (default 3); 'all' measures every eligible setting and "
                         "checks the recommendation from the predicted top 3 against the best measured")
    tu.add_argument("--repeats", type=int, default=2,
                    help="runs per measured setting, interleaved with the others; the fastest counts (default 2)")
    tu.add_argument("--tolerance", type=float, default=5.0,
                    help="%%: a smaller budget within this of the fastest setting is recommended (default 5)")
    tu.add_argument("--threads", type=int, default=None,
                    help="compute threads (default: try all cores and half of them, keep the faster)")
    tu.add_argument("--ctx", type=int, default=512, help="context length the profile sets (default 512)")
    tu.add_argument("-o", "--out", type=Path, default=None, help="output folder (default ./tune-MODEL_NAME)")
    tu.add_argument("--all", action="store_true", help="list every setting in the table")
    tu.add_argument("--traces", type=Path, default=None, metavar="FILE|DIR",
                    help="more routing traces of this model (a file or a folder, e.g. from `edgemoe trace --backend "
                         "llama` on other text) replayed beside the one tune records; the table shows their sum, a "
                         "second table each trace's hit rates")
    tu.set_defaults(func=tune.tune_cmd)
    _predictor_parsers(sub)
    return p


def _serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                        description="An OpenAI-compatible local server (POST /v1/chat/completions and "
                                    "/v1/completions, streamed or not; GET /v1/models, /health, and /metrics in "
                                    "Prometheus text with live expert-cache statistics). One generation at a time "
                                    "with a bounded queue; a prompt that extends the previous one prefills only "
                                    "the new tokens. Without MODEL, the embedded demo model (no chat template: "
                                    "plain continuation, said so in each response). See docs/SERVE.md.")
    sv.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    sv.add_argument("--backend", choices=["edgemoe", "llama"], default="edgemoe",
                    help="edgemoe: our engine with the budgeted expert cache (default); llama: stock llama.cpp")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $EDGEMOE_API_KEY, "
                         "else none)")
    sv.add_argument("--queue", type=int, default=8,
                    help="requests that may wait while one generates (default 8); more are refused with 429")
    sv.add_argument("--max-body", default="1MiB", help="largest request body (default 1MiB); larger ones get 413")
    sv.add_argument("--model-name", default=None, help="model id that /v1/models lists (default: the model's name)")
    sv.add_argument("--seed", type=int, default=0, help="sampling seed of requests that give none (default 0)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default warning; info logs every request)")
    _engine_options(sv)
    sv.set_defaults(func=serve.serve_cmd)


def _compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="MoE-I² compression: prune experts, low-rank the rest, write GGUF",
                       description="Compress a Hugging Face MoE checkpoint with MoE-I² (docs/COMPRESSION.md): "
                                   "expert importance on calibration text, non-uniform per-layer pruning found by a "
                                   "genetic search and a KT-reception field, then per-expert low-rank SVD. Runs layer "
                                   "by layer; writes edgemoe's extended layout (edgemoe engine, not stock llama.cpp).")
    c.add_argument("hf_dir", type=Path, help="checkpoint folder")
    c.add_argument("-o", "--output", type=Path, required=True, help="output .gguf path (written atomically)")
    c.add_argument("--prune", type=float, default=0.25, help="share of all routed experts to remove (default 0.25; 0 skips)")
    c.add_argument("--rank-ratio", type=float, default=1.0,
                   help="share of each kept expert's parameters stored as low-rank factors, ranks from importance "
                        "(default 1: no low-rank stage; 0.7 keeps ~70%%)")
    c.add_argument("--svd", choices=["whitened", "plain"], default="plain",
                   help="plain or activation-aware (whitened) SVD (default plain: with quantized factors it "
                        "measured better; whitened wins with f16/f32 factors, see docs/COMPRESSION.md)")
    c.add_argument("--method", default="moe-i2", help="how experts are chosen: moe-i2 (default), uniform, frequency, "
                                                      "random, naee")
    c.add_argument("--population", type=int, default=24, help="genetic search population (default 24)")
    c.add_argument("--generations", type=int, default=10, help="genetic search generations (default 10)")
    c.add_argument("--crossover", type=float, default=1.0, help="crossover probability (default 1)")
    c.add_argument("--mutation", type=float, default=0.2, help="mutation probability (default 0.2)")
    c.add_argument("--seed", type=int, default=0, help="random seed of the search (default 0)")
    c.add_argument("--keep-k", type=int, default=3, help="K candidates kept per layer (default 3)")
    c.add_argument("--block-t", type=int, default=3, help="T layers per KT-reception-field block (default 3)")
    c.add_argument("--calib", type=Path, default=None,
                   help="calibration text (.txt or .jsonl); default: the demo corpus's train split")
    c.add_argument("--calib-tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    c.add_argument("--kt-tokens", type=int, default=512, help="of those, tokens the KT field measures on (default 512)")
    c.add_argument("--lora-steps", type=int, default=0,
                   help="LoRA recovery: fine-tune steps (one calibration window each) of adapters on the attention "
                        "projections, distilled from the original model, merged before export (default 0: off; "
                        "needs the model in RAM)")
    c.add_argument("--lora-rank", type=int, default=8, help="LoRA adapter rank (default 8)")
    c.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate (default 1e-3)")
    c.add_argument("--type", default="q8_0", help="expert tensor type (default q8_0)")
    c.add_argument("--dense-type", default="f16", help="dense tensor type (default f16)")
    c.add_argument("--eval", type=int, default=0, metavar="TOKENS", dest="eval_tokens",
                   help="also measure held-out perplexity/KL/top-1 vs the original on TOKENS tokens (default: off)")
    c.add_argument("--report", type=Path, default=None, help="write every decision to this .json or .yaml file")
    c.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    c.set_defaults(func=convert.compress_cmd)


def _predictor_parsers(sub) -> None:
    pr = sub.add_parser("predictor", help="train and measure the learned prefetch predictor",
                        description="A small model that forecasts the next MoE layers' experts from the routing "
                                    "so far, trained on routing traces and run with onnxruntime by the prefetcher.")
    psub = pr.add_subparsers(dest="predictor_command", metavar="ACTION", required=True)
    t = psub.add_parser("train", help="train on routing traces, export to ONNX",
                        description="Fit the predictor on traces from `edgemoe trace` (edgemoe backend: they carry "
                                    "the router look-ahead) and write an ONNX file that records the model's layer "
                                    "and expert counts. `--predictor learned` finds it embedded in the model "
                                    "(--embed) or beside it as MODEL.predictor.onnx.")
    t.add_argument("traces", type=Path, nargs="+", help="trace files (one model)")
    t.add_argument("-o", "--output", type=Path, default=None, help="ONNX file to write (needed without --embed)")
    t.add_argument("--embed", type=Path, default=None, metavar="MODEL.gguf",
                   help="also embed the predictor in this GGUF (key edgemoe.predictor.onnx; the file is rewritten "
                        "atomically, a stock file stays loadable by llama.cpp); checked against the traces' model "
                        "before training")
    t.add_argument("--epochs", type=int, default=40, help="at most this many epochs (early stopping; default 40)")
    t.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP (default 128)")
    t.add_argument("--horizon", type=int, default=3, help="MoE layers ahead to predict (1-3, default 3)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=measure.predictor_train_cmd)
    b = psub.add_parser("bench", help="tokens/s and cache counters per predictor at one budget",
                        description="Generate with prefetch off and with each predictor (interleaved runs), "
                                    "check that all produce the same tokens, and report decode tokens/s and hits.")
    b.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    b.add_argument("--predictor", type=Path, default=None, metavar="FILE.onnx", help="the learned predictor")
    b.add_argument("--prompts", type=Path, default=None,
                   help="text file, one prompt per line (default: 8 prompts from the demo corpus's held-out split)")
    b.add_argument("--budget", default="50%", help="expert budget: bytes or a share (default 50%%)")
    b.add_argument("--policy", default=DEFAULT_POLICY)
    b.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    b.add_argument("--repeats", type=int, default=3, help="runs per predictor (default 3; the median is reported)")
    b.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    b.set_defaults(func=measure.predictor_bench_cmd)


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default=None,
                   help="expert cache budget: bytes (2GB, 512MiB) or a share of all experts (50%%); "
                        "default: all experts fit")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"eviction policy: {', '.join(POLICIES)} (default {DEFAULT_POLICY}: each MoE layer's share of "
                        "the budget from its own hit-rate curves, measured while it runs)")
    p.add_argument("--trace", type=Path, default=None, help="routing trace giving Belady's future accesses")
    p.add_argument("--prefetch", action="store_true", help="prefetch the next layer's predicted experts")
    p.add_argument("--max-memory", default=None, metavar="CAP",
                   help="the memory this process may use (e.g. 3GiB): the expert budget is the largest that fits, by "
                        "tune's memory plan (runtime + dense + budget + KV + slack); instead of --budget")
    p.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                   help="--backend llama on a GPU build of llama.cpp: N dense layers on the GPU, experts kept in RAM "
                        "under the expert budget (needs --budget or --max-memory)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=512, help="context length in tokens (default 512)")
    p.add_argument("--kv-type", default="f16", choices=("f16", "f32", "q8_0"),
                   help="KV cache type (default f16, as llama.cpp's; f32: the exact reference; q8_0: half of f16)")
    p.add_argument("--profile", type=Path, default=None,
                   help="settings from `edgemoe tune` (profile.yaml): model, budget, policy, prefetch, threads, "
                        "ctx; options given here override it")
    p.add_argument("--dual-low", default=None, metavar="TYPE",
                   help="dual precision: keep a low-bit copy (q2_k, q3_k, q4_k, q4_0) of every expert resident, "
                        "outside --budget, and serve low-gate cache misses from it")
    p.add_argument("--dual-load-above", type=float, default=0.5, metavar="GATE",
                   help="with --dual-low: a miss whose gate weight is above GATE loads the full copy and waits; "
                        "others run on the low copy (default 0.5; 1.0: every miss low)")
    p.add_argument("--dual-background-load", action="store_true",
                   help="with --dual-low: also load the full copy of a low-served miss in the background")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "profile", None) is not None:
            tune.apply_profile(args, sys.argv[1:] if argv is None else argv)
        from edgemoe.converters.atomic import sigterm_as_interrupt
        # `kill` cleans up like Ctrl-C: partial outputs, and bench --max-memory's cgroups and children
        with sigterm_as_interrupt(args.command in ("convert", "compress", "bench")):
            return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted; no partial output was kept", file=sys.stderr)
        return 130
    except commands.user_errors() as exc:
        print(f"edgemoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
