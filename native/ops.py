"""ggml's graph ops through ctypes, with each result's shape (ne) and strides (nb) worked out in
Python from the operands' (public API only: no reading of ggml's structs).

Shapes are ggml's order: ne[0] is the fastest-varying dimension (a row's values), so a
[T, D] activation is ne (D, T, 1, 1). Every op checks what ggml would assert on first, because a
failed ggml assertion aborts the process instead of raising. Graphs (edgemoe.native.graph) call
these with their context; the results are `Tensor`s that remember their shape for the next op.
"""
from __future__ import annotations

import ctypes
import functools

from gguf import GGMLQuantizationType as QT

from edgemoe.native.lib import _fn, ggml_base, ggml_cpu  # _fn declares one C function's types

F32, F16, I32, I64 = int(QT.F32), int(QT.F16), int(QT.I32), int(QT.I64)
ROPE_NORMAL, ROPE_NEOX = 0, 2  # ggml.h GGML_ROPE_TYPE_*: interleaved pairs (llama) or halves (NeoX)
PREC_F32 = 10  # ggml.h enum ggml_prec
MAX_THREADS = 512  # ggml.h GGML_MAX_N_THREADS
# weight types ggml's CPU backend has no dot product for (activation types, integers, f64): a
# matmul over one segfaults when it computes (measured on this ggml: exit -11 for each)
NO_MATMUL = frozenset(int(t) for t in (QT.Q8_1, QT.Q8_K, QT.I8, QT.I16, QT.I32, QT.I64, QT.F64))


class Tensor:
    """A ggml tensor made by us: its pointer, type, ne and nb (4 dims each)."""
    __slots__ = ("ptr", "type", "ne", "nb", "contiguous", "nbytes")

    def __init__(self, ptr: int, type_: int, ne: tuple[int, ...], nb: tuple[int, ...] | None = None):
        if not ptr:
            raise RuntimeError("ggml returned no tensor (out of context memory?)")
        self.ptr, self.type = ptr, type_
        self.ne = tuple(ne) + (1,) * (4 - len(ne))
        dense = contiguous_nb(type_, self.ne)
        self.nb = tuple(nb) if nb is not None else dense
        self.contiguous = self.nb == dense
        self.nbytes = dense[3] * self.ne[3]  # of the tensor's values laid out contiguously (ggml_nbytes if so)

    def __repr__(self) -> str:
        return f"Tensor(type={self.type}, ne={self.ne})"


def contiguous_nb(type_: int, ne: tuple[int, ...]) -> tuple[int, int, int, int]:
    lib = ggml_base()
    nb1 = lib.ggml_row_size(type_, ne[0])
    return (lib.ggml_type_size(type_), nb1, nb1 * ne[1], nb1 * ne[1] * ne[2])


def nbytes(type_: int, ne: tuple[int, ...]) -> int:
    """Bytes of a contiguous tensor of this type and shape (ggml_nbytes)."""
    n = ggml_base().ggml_row_size(type_, ne[0])
    for d in ne[1:]:
        n *= d
    return n


class ThreadpoolParams(ctypes.Structure):
    # ggml.h struct ggml_threadpool_params
    _fields_ = [("cpumask", ctypes.c_bool * MAX_THREADS), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


@functools.cache
def lib() -> ctypes.CDLL:
    """libggml-base with the graph ops, backend buffers and thread pool declared."""
    c, base = ctypes, ggml_base()
    P, SZ, I64_, INT, FL, BOOL = c.c_void_p, c.c_size_t, c.c_int64, c.c_int, c.c_float, c.c_bool
    # declared here as well as in edgemoe.native.lib: this module owns what the graphs call
    for op in ("ggml_mul_mat", "ggml_mul", "ggml_add", "ggml_div", "ggml_get_rows", "ggml_repeat", "ggml_swiglu_split"):
        _fn(base, op, P, P, P, P)
    for op in ("ggml_soft_max", "ggml_sigmoid", "ggml_sum_rows", "ggml_cont"):
        _fn(base, op, P, P, P)
    _fn(base, "ggml_mul_mat_id", P, P, P, P, P)
    _fn(base, "ggml_new_graph_custom", P, P, SZ, BOOL)
    _fn(base, "ggml_build_forward_expand", None, P, P)
    _fn(base, "ggml_set_input", None, P)
    _fn(base, "ggml_set_output", None, P)
    _fn(base, "ggml_tensor_overhead", SZ)
    _fn(base, "ggml_graph_overhead_custom", SZ, SZ, BOOL)
    _fn(base, "ggml_free", None, P)
    _fn(base, "ggml_backend_tensor_alloc", INT, P, P, P)
    _fn(base, "ggml_backend_tensor_set", None, P, P, SZ, SZ)
    _fn(base, "ggml_backend_tensor_get", None, P, P, SZ, SZ)
    _fn(base, "ggml_backend_graph_compute", INT, P, P)
    _fn(base, "ggml_backend_cpu_buffer_from_ptr", P, P, SZ)
    _fn(base, "ggml_backend_buffer_free", None, P)
    _fn(base, "ggml_gallocr_new", P, P)
    _fn(base, "ggml_gallocr_free", None, P)
    _fn(base, "ggml_gallocr_alloc_graph", BOOL, P, P)
    _fn(base, "ggml_set_rows", P, P, P, P, P)
    _fn(base, "ggml_rms_norm", P, P, P, FL)
    _fn(base, "ggml_scale", P, P, P, FL)
    _fn(base, "ggml_clamp", P, P, P, FL, FL)
    _fn(base, "ggml_argsort_top_k", P, P, P, INT)
    _fn(base, "ggml_cpy", P, P, P, P)
    _fn(base, "ggml_concat", P, P, P, P, INT)
    _fn(base, "ggml_new_tensor_4d", P, P, INT, I64_, I64_, I64_, I64_)
    _fn(base, "ggml_view_1d", P, P, P, I64_, SZ)
    _fn(base, "ggml_view_2d", P, P, P, I64_, I64_, SZ, SZ)
    _fn(base, "ggml_view_3d", P, P, P, I64_, I64_, I64_, SZ, SZ, SZ)
    _fn(base, "ggml_reshape_2d", P, P, P, I64_, I64_)
    _fn(base, "ggml_reshape_3d", P, P, P, I64_, I64_, I64_)
    _fn(base, "ggml_permute", P, P, P, INT, INT, INT, INT)
    _fn(base, "ggml_rope_ext", P, P, P, P, P, INT, INT, INT, FL, FL, FL, FL, FL, FL)
    _fn(base, "ggml_flash_attn_ext", P, P, P, P, P, P, FL, FL, FL)
    _fn(base, "ggml_soft_max_ext", P, P, P, P, FL, FL)
    _fn(base, "ggml_prec_set_acc", BOOL, P, INT)
    _fn(base, "ggml_set_name", P, P, c.c_char_p)
    _fn(base, "ggml_backend_view_init", INT, P)
    _fn(base, "ggml_backend_alloc_ctx_tensors", P, P, P)
    _fn(base, "ggml_backend_get_default_buffer_type", P, P)
    _fn(base, "ggml_backend_buffer_clear", None, P, c.c_uint8)
    _fn(base, "ggml_backend_buffer_get_size", SZ, P)
    _fn(base, "ggml_gallocr_get_buffer_size", SZ, P, INT)
    _fn(base, "ggml_threadpool_params_default", ThreadpoolParams, INT)
    cpu = ggml_cpu()
    _fn(cpu, "ggml_threadpool_new", P, c.POINTER(ThreadpoolParams))
    _fn(cpu, "ggml_threadpool_free", None, P)
    _fn(cpu, "ggml_backend_cpu_set_threadpool", None, P, P)
    return base


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"ggml op refused before native code: {what}")


def _broadcasts(a: Tensor, b: Tensor) -> bool:
    return all(nb and na % nb == 0 for na, nb in zip(a.ne, b.ne))


class Ops:
    """The ops, bound to one ggml context (a graph's)."""

    def __init__(self, ctx: int):
        self.ctx, self.lib = ctx, lib()

    def _new(self, ptr: int, type_: int, ne, nb=None) -> Tensor:
        return self._made(Tensor(ptr, type_, ne, nb))

    def _made(self, t: Tensor) -> Tensor:  # graphs count tensors here
        return t

    def new(self, type_: int, ne: tuple[int, ...]) -> Tensor:
        ne4 = tuple(ne) + (1,) * (4 - len(ne))
        return self._new(self.lib.ggml_new_tensor_4d(self.ctx, type_, *ne4), type_, ne4)

    # ---- matrix products -------------------------------------------------------------
    def mul_mat(self, a: Tensor, b: Tensor) -> Tensor:
        """a [K, M, ...] (a weight: K in-features, M out), b [K, N, ...] -> [M, N, ...]."""
        _check(a.type not in NO_MATMUL, f"mul_mat of a weight of ggml type {a.type} (no CPU dot product)")
        _check(a.ne[0] == b.ne[0] and b.ne[2] % a.ne[2] == 0 and b.ne[3] % a.ne[3] == 0,
               f"mul_mat of ne {a.ne} and {b.ne}")
        return self._new(self.lib.ggml_mul_mat(self.ctx, a.ptr, b.ptr), F32, (a.ne[1], b.ne[1], b.ne[2], b.ne[3]))

    def mul_mat_id(self, arena: Tensor, b: Tensor, ids: Tensor) -> Tensor:
        """arena [K, M, n_slots], b [K, 1 or n_used, N], ids i32 [n_used, N] -> [M, n_used, N]."""
        _check(arena.type not in NO_MATMUL, f"mul_mat_id of an arena of ggml type {arena.type} (no CPU dot product)")
        _check(arena.ne[3] == 1 and arena.ne[0] == b.ne[0] and ids.type == I32 and ids.ne[1] == b.ne[2]
               and ids.ne[0] % b.ne[1] == 0 and ids.ne[2] == ids.ne[3] == 1,
               f"mul_mat_id of ne {arena.ne}, {b.ne}, ids {ids.ne}")
        return self._new(self.lib.ggml_mul_mat_id(self.ctx, arena.ptr, b.ptr, ids.ptr), F32,
                         (arena.ne[1], ids.ne[0], b.ne[2], 1))

    # ---- element-wise ------------------------------------------------------------------
    def _binary(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        _check(_broadcasts(a, b), f"{name} of ne {a.ne} and {b.ne} (b must repeat into a)")
        return self._new(getattr(self.lib, f"ggml_{name}")(self.ctx, a.ptr, b.ptr), a.type, a.ne)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary("add", a, b)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary("mul", a, b)

    def div(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary("div", a, b)

    def _unary(self, name: str, a: Tensor, *args) -> Tensor:
        return self._new(getattr(self.lib, f"ggml_{name}")(self.ctx, a.ptr, *args), a.type, a.ne)

    def scale(self, a: Tensor, s: float) -> Tensor:
        return self._unary("scale", a, s)

    def clamp(self, a: Tensor, lo: float, hi: float) -> Tensor:
        return self._unary("clamp", a, lo, hi)

    def sigmoid(self, a: Tensor) -> Tensor:
        return self._unary("sigmoid", a)

    def soft_max(self, a: Tensor) -> Tensor:
        return self._unary("soft_max", a)

    def rms_norm(self, a: Tensor, eps: float) -> Tensor:
        """RMS-normalise each row (ne[0] values)."""
        return self._unary("rms_norm", a, eps)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up, llama.cpp's LLM_FFN_SILU + LLM_FFN_PAR."""
        _check(gate.ne == up.ne, f"swiglu of ne {gate.ne} and {up.ne}")
        return self._new(self.lib.ggml_swiglu_split(self.ctx, gate.ptr, up.ptr), F32, gate.ne)

    def sum_rows(self, a: Tensor) -> Tensor:
        return self._new(self.lib.ggml_sum_rows(self.ctx, a.ptr), a.type, (1,) + a.ne[1:])

    def cont(self, a: Tensor) -> Tensor:
        return self._new(self.lib.ggml_cont(self.ctx, a.ptr), a.type, a.ne)

    def repeat(self, a: Tensor, like: Tensor) -> Tensor:
        _check(_broadcasts(like, a), f"repeat of ne {a.ne} to {like.ne}")
        return self._new(self.lib.ggml_repeat(self.ctx, a.ptr, like.ptr), a.type, like.ne)

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        _check(all(x == y for i, (x, y) in enumerate(zip(a.ne, b.ne)) if i != dim) and a.type == b.type,
               f"concat of ne {a.ne} and {b.ne} on dim {dim}")
        ne = tuple(x + y if i == dim else x for i, (x, y) in enumerate(zip(a.ne, b.ne)))
        return self._new(self.lib.ggml_concat(self.ctx, a.ptr, b.ptr, dim), a.type, ne)

    # ---- rows, views -------------------------------------------------------------------
    def get_rows(self, a: Tensor, rows: Tensor) -> Tensor:
        """a [n, R, ...], rows i32 [N] -> [n, N] (dequantized to f32 unless a is i32)."""
        _check(rows.type == I32 and rows.ne[2] == rows.ne[3] == 1 and a.ne[2] == rows.ne[1],
               f"get_rows of ne {a.ne} by {rows.ne}")
        return self._new(self.lib.ggml_get_rows(self.ctx, a.ptr, rows.ptr), I32 if a.type == I32 else F32,
                         (a.ne[0], rows.ne[0], rows.ne[1], 1))

    def set_rows(self, dst: Tensor, src: Tensor, rows: Tensor) -> Tensor:
        """Rows `rows` (i64 [N]) of dst [n, R] := src [n, N] (converted to dst's type); a view of dst."""
        _check(rows.type == I64 and src.ne[0] == dst.ne[0] and src.ne[1] == rows.ne[0] and src.type == F32
               and src.ne[2] == src.ne[3] == dst.ne[2] == dst.ne[3] == 1,
               f"set_rows of ne {src.ne} into {dst.ne} by {rows.ne}")
        return self._new(self.lib.ggml_set_rows(self.ctx, dst.ptr, src.ptr, rows.ptr), dst.type, dst.ne, dst.nb)

    def cpy(self, src: Tensor, dst: Tensor) -> Tensor:
        """dst := src (same element count); a view of dst."""
        _check(src.ne[0] * src.ne[1] * src.ne[2] * src.ne[3] == dst.ne[0] * dst.ne[1] * dst.ne[2] * dst.ne[3],
               f"cpy of ne {src.ne} into {dst.ne}")
        return self._new(self.lib.ggml_cpy(self.ctx, src.ptr, dst.ptr), dst.type, dst.ne, dst.nb)

    def _view_fits(self, a: Tensor, ne, offset: int) -> None:
        # ggml asserts the view's contiguous size plus offset fits in the viewed tensor
        _check(nbytes(a.type, ne) + offset <= nbytes(a.type, a.ne), f"view {ne} at +{offset} of ne {a.ne}")

    def view_1d(self, a: Tensor, ne0: int, offset: int = 0) -> Tensor:
        self._view_fits(a, (ne0, 1, 1, 1), offset)
        return self._new(self.lib.ggml_view_1d(self.ctx, a.ptr, ne0, offset), a.type, (ne0,))

    def view_2d(self, a: Tensor, ne0: int, ne1: int, nb1: int, offset: int = 0) -> Tensor:
        self._view_fits(a, (ne0, ne1, 1, 1), offset)
        ts = a.nb[0]
        return self._new(self.lib.ggml_view_2d(self.ctx, a.ptr, ne0, ne1, nb1, offset), a.type, (ne0, ne1),
                         (ts, nb1, nb1 * ne1, nb1 * ne1))

    def view_3d(self, a: Tensor, ne0: int, ne1: int, ne2: int, nb1: int, nb2: int, offset: int = 0) -> Tensor:
        self._view_fits(a, (ne0, ne1, ne2, 1), offset)
        return self._new(self.lib.ggml_view_3d(self.ctx, a.ptr, ne0, ne1, ne2, nb1, nb2, offset), a.type,
                         (ne0, ne1, ne2), (a.nb[0], nb1, nb2, nb2 * ne2))

    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        _check(a.contiguous and len(ne) in (2, 3) and
               ne[0] * ne[1] * (ne[2] if len(ne) == 3 else 1) == a.ne[0] * a.ne[1] * a.ne[2] * a.ne[3],
               f"reshape of ne {a.ne} (contiguous: {a.contiguous}) to {ne}")
        fn = self.lib.ggml_reshape_2d if len(ne) == 2 else self.lib.ggml_reshape_3d
        return self._new(fn(self.ctx, a.ptr, *ne), a.type, ne)

    def permute(self, a: Tensor, *axes: int) -> Tensor:
        """Dim i of `a` becomes dim axes[i] (ggml_permute's convention)."""
        axes = tuple(axes) + tuple(range(len(axes), 4))
        ne, nb = [0] * 4, [0] * 4
        for i, ax in enumerate(axes):
            ne[ax], nb[ax] = a.ne[i], a.nb[i]
        return self._new(self.lib.ggml_permute(self.ctx, a.ptr, *axes), a.type, ne, nb)

    # ---- routing, attention --------------------------------------------------------------
    def top_k(self, a: Tensor, k: int) -> Tensor:
        """Indices of each row's k largest values, largest first: i32 [k, rows] (contiguous)."""
        _check(0 < k <= a.ne[0], f"top {k} of rows of {a.ne[0]}")
        view = self._new(self.lib.ggml_argsort_top_k(self.ctx, a.ptr, k), I32, (k,) + a.ne[1:],
                         (4, 4 * a.ne[0], 4 * a.ne[0] * a.ne[1], 4 * a.ne[0] * a.ne[1] * a.ne[2]))
        return self.cont(view)

    def rope(self, a: Tensor, pos: Tensor, rope: "RopeParams") -> Tensor:
        """a [d, heads, T] rotated on its first rope.n_dims values; pos i32 [T]."""
        _check(pos.type == I32 and pos.ne[0] == a.ne[2] and 0 < rope.n_dims <= a.ne[0] and rope.n_dims % 2 == 0,
               f"rope of {rope.n_dims} dims over ne {a.ne} (even, 2..ne[0])")
        r = rope
        return self._new(self.lib.ggml_rope_ext(self.ctx, a.ptr, pos.ptr, None, r.n_dims, r.mode, r.n_ctx_orig,
                                                r.base, r.freq_scale, r.ext_factor, r.attn_factor, r.beta_fast,
                                                r.beta_slow), a.type, a.ne)

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        """q [dk, T, H], k [dk, n_kv, Hkv], v [dv, n_kv, Hkv], mask f16 [n_kv, >= T] -> [dv, H, T]."""
        _check(q.ne[0] == k.ne[0] and k.ne[1] == v.ne[1] and k.ne[2] == v.ne[2] and q.ne[2] % k.ne[2] == 0
               and mask.type == F16 and mask.ne[0] == k.ne[1] and mask.ne[1] >= q.ne[1],
               f"flash_attn of q {q.ne}, k {k.ne}, v {v.ne}, mask {mask.ne}")
        t = self._new(self.lib.ggml_flash_attn_ext(self.ctx, q.ptr, k.ptr, v.ptr, mask.ptr, scale, 0.0, 0.0), F32,
                      (v.ne[0], q.ne[2], q.ne[1], 1))
        self.lib.ggml_prec_set_acc(t.ptr, PREC_F32)  # as llama.cpp's build_attn_mha
        return t


    def soft_max_masked(self, a: Tensor, mask: Tensor, scale: float) -> Tensor:
        """softmax(a * scale + mask) over each row; a [n_kv, T, H], mask [n_kv, >= T]."""
        _check(mask.ne[0] == a.ne[0] and mask.ne[1] >= a.ne[1] and mask.type in (F16, F32),
               f"soft_max_ext of ne {a.ne} with mask {mask.ne}")
        return self._new(self.lib.ggml_soft_max_ext(self.ctx, a.ptr, mask.ptr, scale, 0.0), F32, a.ne)


class RopeParams:
    """ggml_rope_ext's arguments (YaRN off unless ext_factor > 0)."""
    __slots__ = ("n_dims", "mode", "base", "n_ctx_orig", "freq_scale", "ext_factor", "attn_factor", "beta_fast",
                 "beta_slow")

    def __init__(self, n_dims: int, neox: bool, base: float, n_ctx_orig: int = 0, freq_scale: float = 1.0,
                 ext_factor: float = 0.0, attn_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0):
        self.n_dims, self.mode = n_dims, ROPE_NEOX if neox else ROPE_NORMAL
        self.base, self.n_ctx_orig = base, n_ctx_orig
        self.freq_scale, self.ext_factor, self.attn_factor = freq_scale, ext_factor, attn_factor
        self.beta_fast, self.beta_slow = beta_fast, beta_slow
