"""A file whose tensors disagree with its hyper-parameters is refused when the model opens, with one
ModelFileError naming the file, the tensor and the value (edgemoe.model_check); and the native
guards (edgemoe.native.ops, graph, tensors) raise where ggml would assert.

Each crafted file below is a tiny checkpoint (models/tiny.py) converted to f32 with one edit. With
the checks disabled, `edgemoe generate` on each aborted inside ggml (SIGABRT in
GGML_ASSERT(ggml_can_mul_mat), exit -6), segfaulted (the I32 weight, exit -11) or hung (RoPE over 0
dims), measured. Tensor
dims are edited keeping the tensor's byte size, so llama.cpp's own GGUF reader (the tokenizer's
vocab-only load) accepts the file and the first token reaches ggml. Anything that runs native code
on them runs in a child process: an abort kills only the child, and its exit code tells.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

import tiny_files
from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.model_check import check_model
from gguf_edit import set_kv, set_tensor_dims, set_tensor_type


def _dims(name, *ne):
    return lambda p: set_tensor_dims(p, name, *ne)


# (case, tiny arch, edit, what the error must name besides the file)
CRAFTED = [
    # issue 16: DeepSeek-V2's RoPE split halved, all offsets valid (k_b then gets 40-wide q_nope rows, not 32)
    ("deepseek2-rope-halved", "deepseek2", lambda p: set_kv(p, "deepseek2.rope.dimension_count", 8),
     ["blk.0.attn_kv_a_mqa.weight", "rope.dimension_count 8"]),
    ("deepseek2-k_b-width", "deepseek2", _dims("blk.1.attn_k_b.weight", 16, 128),
     ["blk.1.attn_k_b.weight", "[4, 128, 16]", "key_length_mla 48 - rope.dimension_count 16"]),
    ("mixtral-attn_output-width", "mixtral", _dims("blk.1.attn_output.weight", 128, 512),
     ["blk.1.attn_output.weight", "head_count 4 x key_length 64"]),
    ("qwen2moe-shared-down-width", "qwen2moe", _dims("blk.1.ffn_down_shexp.weight", 256, 512),
     ["blk.1.ffn_down_shexp.weight", "FFN width 512 (ffn_gate_shexp)"]),
    ("olmoe-attn_k-width", "olmoe", _dims("blk.0.attn_k.weight", 128, 512),
     ["blk.0.attn_k.weight", "head_count_kv 4 x key_length 64"]),
    # gate/up/down form one FFN (so the cache's own check passes), but over hidden 128, not 256
    ("qwen3moe-experts-hidden", "qwen3moe",
     lambda p: [_dims(f"blk.2.ffn_{r}_exps.weight", 128, 512)(p) for r in ("gate", "up")]
     + [_dims("blk.2.ffn_down_exps.weight", 512, 128)(p)],
     ["blk.2.ffn_gate_exps.weight", "embedding_length 256"]),
    ("mixtral-i32-weight", "mixtral", lambda p: set_tensor_type(p, "blk.0.attn_q.weight", 26),
     ["blk.0.attn_q.weight", "I32"]),
    # not an abort: ggml's rope over 0 dims never returned (the engine's graphs, measured)
    ("mixtral-rope-zero", "mixtral", lambda p: set_kv(p, "llama.rope.dimension_count", 0),
     ["llama.rope.dimension_count = 0"]),
]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """case -> crafted file (each arch converted to f32 once)."""
    root = tmp_path_factory.mktemp("model-check")
    files = {}
    for case, arch, edit, _ in CRAFTED:
        files[case] = root / f"{case}.gguf"
        shutil.copy(tiny_files.stock(arch, "f32", root), files[case])
        edit(files[case])
    return files


@pytest.mark.parametrize("case,arch,edit,names", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_file_is_refused_naming_file_tensor_and_value(crafted, case, arch, edit, names):
    path = crafted[case]
    with pytest.raises(ModelFileError) as err:
        check_model(GGUFFile(path))
    for name in [str(path), *names]:
        assert name in str(err.value)


def test_unedited_files_pass_in_every_layout(tmp_path):
    """No false alarms: stock q8_0 of every arch, the mixed and the compressed (pruned, low-rank)
    extended layouts, the demo model."""
    from edgemoe.demo import demo_gguf

    files = [tiny_files.stock(arch, "q8_0", tmp_path) for arch in tiny_files.ARCHS]
    files += [tiny_files.mixed("deepseek2", tmp_path), tiny_files.compressed("qwen2moe", tmp_path), demo_gguf()]
    for path in files:
        check_model(GGUFFile(path))


_RUN_TWO_TOKENS = textwrap.dedent("""
    import sys
    from edgemoe.engine import Engine, EngineConfig
    engine = Engine(sys.argv[1], EngineConfig(n_threads=1, n_ctx=32))
    print([e.token for e in engine.stream_generate("def f(x):", max_tokens=2)])
    engine.close()
""")


def test_many_mla_heads_run(tmp_path):
    """129 heads. The first engine ran DeepSeek's attn_k_b / attn_v_b as one matmul per head in one
    graph, and one head more than its 256 leaves aborted in ggml_build_forward_expand
    (GGML_ASSERT(cgraph->n_leafs < cgraph->size)); the engine now runs them as one batched matmul."""
    from test_convert_archs import build_variant

    from edgemoe.converters.convert import convert

    heads = 129  # transformers wants the hidden size a multiple of the head count
    ckpt = build_variant("deepseek2", tmp_path / "hf", num_attention_heads=heads, hidden_size=2 * heads)
    convert(ckpt, tmp_path / "heads.gguf", "f32")
    check_model(GGUFFile(tmp_path / "heads.gguf"))
    done = subprocess.run([sys.executable, "-c", _RUN_TWO_TOKENS, str(tmp_path / "heads.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("[")


_GENERATE_EACH = textwrap.dedent("""
    import contextlib, io, json, sys
    from edgemoe.cli import main
    for path in sys.argv[1:]:
        print(json.dumps({"start": path}), flush=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["generate", path, "-p", "def f(x):", "-n", "2", "--threads", "1"])
        print(json.dumps({"path": path, "rc": rc, "stderr": err.getvalue()}), flush=True)
""")


def test_generate_on_crafted_files_is_one_line_error_in_a_child(crafted):
    """What a user sees: `edgemoe generate` exits 2 with one line naming the file; nothing aborts."""
    import json

    paths = [str(crafted[case]) for case, *_ in CRAFTED]
    done = subprocess.run([sys.executable, "-c", _GENERATE_EACH, *paths], capture_output=True, text=True, timeout=600)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, f"exit {done.returncode} while running {events[-1] if events else '?'}: {done.stderr[-2000:]}"
    results = [e for e in events if "rc" in e]
    assert [r["path"] for r in results] == paths
    for r in results:
        lines = r["stderr"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1, r
        assert lines[0].startswith(f"edgemoe generate: error: {r['path']}: "), r


def test_extended_expert_of_a_type_ggml_cannot_multiply_is_refused(tmp_path):
    """An I32 expert matrix (the layout's type table is checked later, by expert_store): ggml's
    matmul on it segfaulted."""
    path = tmp_path / "i32-expert.gguf"
    shutil.copy(tiny_files.mixed("deepseek2", tmp_path), path)
    set_tensor_type(path, "blk.1.expert.0.ffn_up.weight", 26)
    with pytest.raises(ModelFileError, match=r"blk\.1\.expert\.0\.ffn_up\.weight has type I32.*cannot multiply"):
        check_model(GGUFFile(path))


# A guard script runs in a child (an abort kills only the child); each `expect` prints one line.
_EXPECT = textwrap.dedent("""
    def expect(what, f):
        try:
            f()
        except ValueError as e:
            print(what, "raised", e, flush=True)
        else:
            print(what, "did not raise", flush=True)
""")


def _child_lines(script: str) -> list[str]:
    """The script's output lines, run in a child; it must exit 0 (no abort, no segfault)."""
    done = subprocess.run([sys.executable, "-c", _EXPECT + script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


_OPS_GUARDS = textwrap.dedent("""
    from gguf import GGMLQuantizationType as QT
    from edgemoe.native import ops
    from edgemoe.native.backend import CpuBackend
    from edgemoe.native.graph import Graph

    with Graph(CpuBackend(1), "guards", 64) as g:
        x = g.input(ops.F32, (32, 2))
        expect("i32 weight", lambda: g.mul_mat(g.input(int(QT.I32), (32, 8)), x))
        expect("matmul width", lambda: g.mul_mat(g.input(ops.F32, (16, 8)), x))
        gate, up = g.input(ops.F32, (8, 2)), g.input(ops.F32, (4, 2))
        expect("swiglu shapes", lambda: g.swiglu(gate, up))
        expect("add broadcast", lambda: g.add(gate, g.input(ops.F32, (3, 2))))
        q, pos = g.input(ops.F32, (64, 4, 2)), g.input(ops.I32, (2,))
        expect("rope 0 dims", lambda: g.rope(q, pos, ops.RopeParams(0, False, 10000.0)))
        expect("rope odd dims", lambda: g.rope(q, pos, ops.RopeParams(3, False, 10000.0)))
        print("rope 64 dims", g.rope(q, pos, ops.RopeParams(64, False, 10000.0)).ne)
""")


def test_graph_ops_refuse_what_ggml_would_abort_or_hang_on():
    """The engine's graph ops (edgemoe.native.ops): a weight type without a CPU dot product
    (segfault), widths that disagree (abort: ggml_can_mul_mat), swiglu operands of two shapes and
    an operand that does not broadcast (abort: ggml_are_same_shape, ggml_can_repeat), RoPE over 0
    dims (hang) or an odd count."""
    lines = _child_lines(_OPS_GUARDS)
    assert len(lines) == 7 and all(" raised ggml op refused before native code" in line for line in lines[:6]), lines
    assert "ggml type 26" in lines[0] and "mul_mat of ne (16, 8, 1, 1) and (32, 2, 1, 1)" in lines[1]
    assert "swiglu of ne (8, 2, 1, 1) and (4, 2, 1, 1)" in lines[2] and "add of ne (8, 2, 1, 1) and (3, 2" in lines[3]
    assert lines[6] == "rope 64 dims (64, 4, 2, 1)"


_GRAPH_LIMIT = textwrap.dedent("""
    import numpy as np
    from edgemoe.native import ops
    from edgemoe.native.backend import CpuBackend
    from edgemoe.native.buffers import Buffer
    from edgemoe.native.graph import Graph

    # 32x32 weights outside the graph (leaves of it, as a model's are); the graph's own tensors are
    # x and one matmul per weight: 56 of them fit a graph of 64 (8 are kept for ggml's own)
    backend, n = CpuBackend(1), 56
    weights = Buffer(backend, {f"w{j}": (ops.F32, (32, 32)) for j in range(n)})
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, 32, 32), dtype=np.float32)
    for j in range(n):
        weights.lib.ggml_backend_tensor_set(weights[f"w{j}"].ptr, w[j].ctypes.data, 0, w[j].nbytes)
    xs = rng.standard_normal((2, 32), dtype=np.float32)
    with Graph(backend, "limit", max_tensors=64) as g:
        x = g.input(ops.F32, (32, 2))
        ys = [g.output(g.mul_mat(weights[f"w{j}"], x)) for j in range(n - 1)]
        try:
            g.mul_mat(weights[f"w{n - 1}"], x)
        except RuntimeError as e:
            print("past the limit raised", e, flush=True)
        g.feed(x, xs)
        g.compute()
        err = max(float(np.abs(g.read(y) - xs @ w[j].T).max()) for j, y in enumerate(ys))
    print("at the limit", len(ys), err < 1e-4)
""")


def test_a_graph_past_its_tensor_count_raises_and_one_at_it_computes():
    """The first engine's graphs aborted on one leaf too many (GGML_ASSERT(cgraph->n_leafs <
    cgraph->size)); a graph now stops at its tensor count (its size is 4x that, for the leaves)."""
    lines = _child_lines(_GRAPH_LIMIT)
    assert lines[0].startswith("past the limit raised graph 'limit' needs more than 64 tensors"), lines
    assert lines[1:] == ["at the limit 55 True"]


_WEIGHT_GUARDS = textwrap.dedent("""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from edgemoe.native.buffers import HostTensors
    from edgemoe.native.tensors import Weight, aligned_empty

    buf = aligned_empty(32 * 32 * 4 + 64)
    expect("host misaligned", lambda: HostTensors(buf.ctypes.data + 4, 4096, 1, "h"))
    expect("i32 weight", lambda: Weight(buf[:4096], QT.I32, 32, 32, "w"))
    expect("short bytes", lambda: Weight(buf[:4000], QT.F32, 32, 32, "w"))
    expect("misaligned", lambda: Weight(buf[4:4100], QT.F32, 32, 32, "w"))
    buf[:] = 0
    w = Weight(buf[32:4128], QT.F32, 32, 32, "w")
    print("aligned", w.rows, w.cols, bool(w.tensor))
    w.close()
""")


def test_tensors_over_our_memory_refuse_what_ggml_would_abort_on():
    """Tensors over memory we own (native.buffers.HostTensors: expert arenas, a file's memmap) and a
    resident expert's matrices (native.tensors.Weight): memory not 32-byte aligned (HostTensors
    asked ggml for the buffer before checking: SIGABRT in ggml_backend_cpu_buffer_from_ptr,
    measured), a type without a CPU dot product, bytes that are not the matrix's size."""
    lines = _child_lines(_WEIGHT_GUARDS)
    assert len(lines) == 5 and lines[0].startswith("host misaligned raised h: memory at 0x"), lines
    assert "is not 32-byte aligned" in lines[0]
    assert all(" raised w: " in line for line in lines[1:4]), lines
    assert "cannot multiply a I32" in lines[1] and "4000 bytes given" in lines[2] and "aligned" in lines[3]
    assert lines[4] == "aligned 32 32 True"


def test_a_layer_count_past_the_tensors_is_refused_at_once(tmp_path):
    """block_count = 998934001 (a fuzz case): every reader loops over block_count layers, and the
    expert scan ran for minutes; the file is refused when it is opened."""
    import time

    path = tmp_path / "layers.gguf"
    shutil.copy(tiny_files.stock("mixtral", "q8_0", tmp_path), path)
    set_kv(path, "llama.block_count", 998934001)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=r"llama\.block_count = 998934001, but its tensors hold 3 layers"):
        GGUFFile(path)
    assert time.perf_counter() - start < 5


def test_an_architecture_the_engine_does_not_run_is_named_with_the_file(tmp_path):
    """general.architecture 'llama' -> 'xlama' (a fuzz case): the registry's error named no file."""
    from gguf_edit import set_string

    path = tmp_path / "arch.gguf"
    shutil.copy(tiny_files.stock("mixtral", "q8_0", tmp_path), path)
    set_string(path, "general.architecture", "xlama")
    with pytest.raises(ModelFileError, match=rf"{path}: architecture 'xlama' is not one the edgemoe engine runs"):
        check_model(GGUFFile(path))
