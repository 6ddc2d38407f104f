"""Triton kernels for the factored attention at degree <= 3: what `lrcompile::factored_attention`
and `lrcompile::factored_attention_backward` compute, as `lrcompile::triton_factored_attention`
and `lrcompile::triton_factored_attention_backward`.

Inputs as in lrcompile.kernels.reference: q (B, H, G, n_q, d), k (B, H, n_k, d), v (B, H, n_k, d_v),
key_weight (B, H, n_k) or None, coefficients c_0..c_g, scale, causal, chunk_size. The keys are
centred (k' = sqrt(s) k - mu, non-causal) and q' = sqrt(s) q is formed in torch around the
kernels, as kernels/reference.py does; the kernels run the sweeps. The accuracy guard (lrcompile.ops.guard)
is not part of these ops: it reads data, so the caller composes it.

Features, by slices.  With x~ = [x | 1] (index d is the constant 1),

    P(q'.k') = c_0 + sum_p c_p sum_{e < d} m_p(q') q'_e m_p(k') k'_e,    m_p(x) = x~_a x~_b,

over slices p = (a, b), a <= b <= d. A slice is d features, m_p(x) x_e for e < d: a row-scaled
copy of x. So a tile of features is one broadcast multiply of the input tile, formed on chip and
consumed by the state product: no feature tensor ever reaches global memory.

    degree <= 2   slices (a, d), a in [0, d]:   m = x_a (c_p = c_2) and m = 1 (c_p = c_1)
    degree 3      slices (a, b), a <= b <= d:   m = x_a x_b, b < d (c_p = c_3, twice for a < b,
                  since (b, a) shares the slice), and the degree-2 and degree-1 slices above

Ordered triples (a, b, e) would need no multiplicity but d^3 features; pairs a <= b halve that
(d = 32: 561 slices against 1089). The constant feature (c_0) rides with the last slice, (d, d).
Slices are numbered row-major over the triangle: p = a (d + 1) - a (a - 1) / 2 + (b - a).

The state layout (what the forward returns and the backward consumes; not reference.py's
symmetric layout): S (B, H, n_slices d + 1, d_v + 1), row p d + e holding feature (p, e), the
last row the constant feature; columns [W^ = w V | w] summed over keys, the last column the
denominator's. At degree 2 that is d (d + 1) + 1 rows (d = 64: 4161 against 2145 symmetric
ones), at degree 3 (d + 1)(d + 2) d / 2 + 1 (d = 32: 17953 against 6545); the kernels trade that
factor for features formed by one multiply. Coefficients are never stored in a state: they are
applied where a state is contracted with query features (phi carries the coefficients, psi none,
as in lrcompile.features).

Kernels (grid, tile shapes, FLOPs and bytes in each kernel's docstring):

    non-causal  _state_kernel          T = sum_j feat(x_j)^T Y_j           S from keys, R from queries
                _apply_state_kernel    U_i = sum_f c_f feat_f(x_i) T_f,    dx_i from dfeat = c T Y_i
    causal      _block_forward_kernel  in-chunk C x C block P(X) masked, applied directly
                _chunk_states_kernel   the state entering each chunk: S_<c over keys (forward and
                                       backward, recomputed), R_>c over queries (backward, reverse)
                _apply_state_kernel    CHUNKED: row i against its chunk's state, added to the block's share
                _block_query_backward_kernel / _block_key_backward_kernel   in-chunk block's gradients

The causal path is chunkwise parallel, as fast linear-attention kernels are: the only serial part
is _chunk_states_kernel's walk over chunks (one program per slice of the state, storing the state
entering every chunk, (BH, n_q / C, rows, d_v + 1) float32), after which every row block is
independent. Each row's result is written by the one program that owns the row (the block kernel
stores, the chunked apply kernel adds): no atomics.

Tiles. The row tile (_block_size) and, causal, the chunk (kernel_chunk) default to fixed values;
on a GPU where benchmarks/gpu_check.py timed the small space lrcompile.kernels.triton_tuning.SPACE, the
best recorded there for (d, degree, dtype, causal) is used instead.

Precision. Every tile product accumulates in float32, and running states are float32. Operands
stay in the caller's dtype: q', k', W^ and G^ are formed in torch in the inputs' dtype (no float32
copy of a half input), and DOT_PRECISION_FOR_DTYPE says how tiles multiply. Half inputs ("bf16",
"fp16") round both operands of every product to that dtype, features and states included, and
take one tensor-core product, as fast linear-attention kernels do; float32 inputs use "tf32x3"
(three tf32 tensor-core products, float32-accurate to a few ulps; "ieee" would fall back to FMA
loops that spill at these tiles). Elementwise work (features, the polynomial block) is float32.
The tests (tests/test_triton_kernels.py) state the tolerances.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/test_triton_kernels.py
calls `forward` and `backward` below directly). `supports` says what the kernels accept; elsewhere
`forward`/`backward` fall back to the torch sweep (lrcompile.kernels.reference).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from lrcompile.kernels import triton_tuning
from lrcompile.kernels.operands import append_ones as _append_ones
from lrcompile.kernels.operands import valid_mean_correction as _valid_mean_correction
from lrcompile.kernels.operands import with_key_weights as _weighted

MAX_DEGREE = 3
# The largest head dim d per degree. Degree 3 stops at 32: one program per slice, and 561 slices
# of a (d + 1) (d + 2) / 2-slice state are already 17953 x (d_v + 1) float32 rows per head.
MAX_HEAD_DIM = {0: 128, 1: 128, 2: 128, 3: 32}
MAX_VALUE_DIM = 128
# Tile products per input dtype (module docstring, "Precision").
DOT_PRECISION_FOR_DTYPE = {torch.float32: "tf32x3", torch.float16: "fp16", torch.bfloat16: "bf16"}


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, coefficients) -> str | None:
    """Why the Triton kernels do not run this call, or None where they do."""
    degree, head_dim, value_dim = len(coefficients) - 1, q.shape[-1], v.shape[-1]
    accepted = ", ".join(f"d <= {d} at degree {g}" for g, d in MAX_HEAD_DIM.items())
    if degree not in MAX_HEAD_DIM:
        return f"degree {degree}; the Triton kernels accept degree <= {MAX_DEGREE}"
    if head_dim > MAX_HEAD_DIM[degree]:
        return f"head dim d = {head_dim} at degree {degree}; the Triton kernels accept {accepted}"
    if value_dim > MAX_VALUE_DIM:
        return f"value dim d_v = {value_dim}; the Triton kernels accept d_v <= {MAX_VALUE_DIM}"
    if q.dtype not in DOT_PRECISION_FOR_DTYPE:
        return f"dtype {q.dtype}; the Triton kernels accept {', '.join(map(str, DOT_PRECISION_FOR_DTYPE))}"
    return None


def supports(q: torch.Tensor, v: torch.Tensor, coefficients) -> bool:
    """True where the Triton kernels run this call; elsewhere `forward`/`backward` fall back to the torch sweep."""
    return unsupported_reason(q, v, coefficients) is None


def slice_count(head_dim: int, degree: int) -> int:
    """Slices of the state (module docstring): d + 1 at degree <= 2, (d + 1)(d + 2) / 2 at degree 3."""
    return head_dim + 1 if degree <= 2 else (head_dim + 1) * (head_dim + 2) // 2


def state_rows(head_dim: int, degree: int = 2) -> int:
    """Rows of the Triton state: one per feature of every slice, and the constant feature."""
    return slice_count(head_dim, degree) * head_dim + 1


# ---- kernels ------------------------------------------------------------------------------------
# Shared notation: D >= d and DV >= d_v are the padded (power of two, >= 16 for tl.dot) tile
# widths, D1 >= d + 1 a power of two; Y is a (rows, d_v + 1) operand ([w V | w] or G^) whose first
# d_v columns are loaded as a (rows, DV) tile and whose last column as a vector, so DV need not
# cover d_v + 1. Padded columns and rows load as zero, so they add nothing to any product. A
# scalar condition in a mask is broadcast to the vector first (`rows * 0 + a < d`): the
# interpreter rejects scalar & vector masks. DEGREE (<= 2 or 3) only chooses the slices.


@triton.jit
def _head_id():
    """Program axis 0, the flattened (batch, head), as int64: head * stride_head passes 2^31 past
    ~1000 heads of a degree-3 (or d = 128) state, and int32 products would wrap."""
    return tl.program_id(0).to(tl.int64)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a b accumulated in float32. DOT_PRECISION "bf16" or "fp16": the operands are rounded to the
    inputs' half dtype, one tensor-core product; otherwise float32 operands at that input_precision."""
    if DOT_PRECISION == "bf16":
        product = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif DOT_PRECISION == "bf16_in_fp32":  # the same products, where tl.dot cannot take bfloat16 (_Launch.of)
        product = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    elif DOT_PRECISION == "fp16":
        product = tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        product = tl.dot(a, b, input_precision=DOT_PRECISION)
    return product


@triton.jit
def _load_rows(ptr, rows, row_mask, width, WIDTH: tl.constexpr):
    """A (rows, WIDTH) float32 tile of a row-major matrix with `width` columns (row stride given in ptr math)."""
    columns = tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (columns[None, :] < width)
    return tl.load(ptr + columns[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _slice_factors(p, d, DEGREE: tl.constexpr, D1: tl.constexpr):
    """(a, b) of slice p, its features x~_a x~_b x_e (index d of x~ = [x | 1] is the 1).

    Degree <= 2: p = a, b = d. Degree 3: row a of the triangle a <= b <= d starts at
    a (d + 1) - a (a - 1) / 2, so a is the number of rows starting at or before p, less one.
    """
    if DEGREE == 3:
        rows = tl.arange(0, D1)
        starts = rows * (d + 1) - rows * (rows - 1) // 2
        a = tl.sum(((starts <= p) & (rows <= d)).to(tl.int32), axis=0) - 1
        b = a + p - (a * (d + 1) - a * (a - 1) // 2)
    else:
        a = p
        b = d
    return a, b


@triton.jit
def _slice_coefficient(a, b, d, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """c_p of slice (a, b), a <= b: c_3 for x_a x_b (twice where a < b: (b, a) shares it), c_2 for
    x_a alone, c_1 for the linear slice."""
    return tl.where(b < d, tl.where(a == b, C3, 2.0 * C3), tl.where(a < d, C2, C1))


@triton.jit
def _load_multipliers(row_ptrs, rows, row_mask, a, b, d):
    """x~_a and x~_b of each row (two (BLOCK,) vectors); the slice's row scale is their product."""
    x_a = tl.load(row_ptrs + a, mask=row_mask & (rows * 0 + a < d), other=1.0).to(tl.float32)
    x_b = tl.load(row_ptrs + b, mask=row_mask & (rows * 0 + b < d), other=1.0).to(tl.float32)
    return x_a, x_b


@triton.jit
def _feature_gradient(x, x_a, x_b, d_features, a, b, d, D: tl.constexpr):
    """dL/dx for the slice's features x~_a x~_b x_e with gradients d_features (rows, D):
    x~_a x~_b dF_e into column e, and with s = sum_e dF_e x_e, s x~_b into column a (a < d) and
    s x~_a into column b (b < d); a = b gets both, 2 s x_a."""
    columns = tl.arange(0, D)
    through_scale = tl.sum(d_features * x, axis=1)[:, None]
    on_a = ((columns == a) & (columns * 0 + a < d))[None, :]
    on_b = ((columns == b) & (columns * 0 + b < d))[None, :]
    return ((x_a * x_b)[:, None] * d_features + tl.where(on_a, through_scale * x_b[:, None], 0.0)
            + tl.where(on_b, through_scale * x_a[:, None], 0.0))


# A state (BH, n_slices d + 1, d_v + 1) is read and written one slice at a time: rows p d + e,
# e < d, as a (D, DV) value tile and its (D,) denominator column; the constant row separately.


@triton.jit
def _load_slice(state_ptr, p, d, d_v, D: tl.constexpr, DV: tl.constexpr):
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    feature_rows = (p * d + columns) * (d_v + 1)
    slice_v = tl.load(state_ptr + feature_rows[:, None] + values[None, :],
                      mask=(columns[:, None] < d) & (values[None, :] < d_v), other=0.0)
    slice_1 = tl.load(state_ptr + feature_rows + d_v, mask=columns < d, other=0.0)
    return slice_v, slice_1


@triton.jit
def _load_constant(state_ptr, n_slices, d, d_v, DV: tl.constexpr):
    values = tl.arange(0, DV)
    constant_row = state_ptr + n_slices * d * (d_v + 1)
    return (tl.load(constant_row + values, mask=values < d_v, other=0.0),
            tl.load(constant_row + d_v + tl.arange(0, 1)))


@triton.jit
def _store_slice(state_ptr, p, n_slices, d, d_v, slice_v, slice_1, constant_v, constant_1,
                 D: tl.constexpr, DV: tl.constexpr):
    """Slice p; the program of the last slice also writes the constant row."""
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    feature_rows = (p * d + columns) * (d_v + 1)
    tl.store(state_ptr + feature_rows[:, None] + values[None, :], slice_v,
             mask=(columns[:, None] < d) & (values[None, :] < d_v))
    tl.store(state_ptr + feature_rows + d_v, slice_1, mask=columns < d)
    constant_row = state_ptr + n_slices * d * (d_v + 1)
    tl.store(constant_row + values, constant_v, mask=(values < d_v) & (values * 0 + p == n_slices - 1))
    tl.store(constant_row + d_v + tl.arange(0, 1), constant_1, mask=tl.arange(0, 1) + p == n_slices - 1)


@triton.jit
def _add_rows_to_slice(x, x_a, x_b, y_v, y_1, slice_v, slice_1, constant_v, constant_1, DOT_PRECISION: tl.constexpr):
    """Adds rows (x, [y_v | y_1]) to slice p's share of the state: its features are the rows x scaled
    by x_a x_b (BLOCK_N, D), formed here and never stored; the constant feature's share rides along."""
    features = (x_a * x_b)[:, None] * x
    slice_v += _dot(tl.trans(features), y_v, DOT_PRECISION)
    slice_1 += tl.sum(features * y_1[:, None], axis=0)
    constant_v += tl.sum(y_v, axis=0)
    constant_1 += tl.sum(y_1, axis=0)
    return slice_v, slice_1, constant_v, constant_1


@triton.jit
def _state_kernel(x_ptr, y_ptr, state_ptr, n_rows, d, d_v, n_slices, rows_per_split,
                  stride_x_head, stride_x_row, stride_y_head, stride_y_row, stride_state_head, stride_state_split,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr,
                  DEGREE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """T_(p,e) = sum_j x~_ja x~_jb x_je Y_j  and  T_1 = sum_j Y_j   (no coefficients), over one split of the rows.

    Grid (BH, n_slices, splits): program (h, p, s) sums rows s R .. s R + R - 1 (R = rows_per_split)
    into rows p d .. p d + d - 1 of head h's partial state s (the last slice also the constant
    row); the launcher adds the splits' partial states (no atomics). Per step: x (BLOCK_N, D), its
    slice scale (BLOCK_N,), Y (BLOCK_N, DV) + (BLOCK_N,); the accumulator is the (D, DV) slice and
    its (D,) denominator column, in float32 registers. Per call: 2 n r (d_v + 1) FLOPs (r = n_slices
    d + 1 rows); reads x, Y once per slice (n_slices n (d + d_v + 1) elements), writes splits r (d_v + 1) floats.
    """
    head, p, split = _head_id(), tl.program_id(1), tl.program_id(2)
    a, b = _slice_factors(p, d, DEGREE, D1)
    x_ptr += head * stride_x_head
    y_ptr += head * stride_y_head
    slice_v = tl.zeros((D, DV), dtype=tl.float32)
    slice_1 = tl.zeros((D,), dtype=tl.float32)
    constant_v = tl.zeros((DV,), dtype=tl.float32)
    constant_1 = tl.zeros((1,), dtype=tl.float32)
    first_row = split * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, n_rows)
    for start in range(first_row, end_row, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_mask = rows < end_row
        x = _load_rows(x_ptr + rows[:, None] * stride_x_row, rows, row_mask, d, D)
        x_a, x_b = _load_multipliers(x_ptr + rows * stride_x_row, rows, row_mask, a, b, d)
        y_v = _load_rows(y_ptr + rows[:, None] * stride_y_row, rows, row_mask, d_v, DV)
        y_1 = tl.load(y_ptr + rows * stride_y_row + d_v, mask=row_mask, other=0.0).to(tl.float32)
        slice_v, slice_1, constant_v, constant_1 = _add_rows_to_slice(
            x, x_a, x_b, y_v, y_1, slice_v, slice_1, constant_v, constant_1, DOT_PRECISION)
    _store_slice(state_ptr + head * stride_state_head + split * stride_state_split, p, n_slices, d, d_v, slice_v,
                 slice_1, constant_v, constant_1, D, DV)


@triton.jit
def _apply_state_kernel(x_ptr, state_ptr, y_ptr, u_ptr, dx_ptr, n_rows, d, d_v, n_slices, groups, chunk_size, n_chunks,
                        stride_x_head, stride_x_row, stride_state_head, stride_state_chunk, stride_y_head, stride_y_row,
                        stride_u_head, stride_u_row, stride_dx_head, stride_dx_row,
                        BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr,
                        DEGREE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        STORE_U: tl.constexpr, GRADIENT: tl.constexpr, CHUNKED: tl.constexpr, ACCUMULATE: tl.constexpr,
                        C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """U_i = sum_f c_f feat_f(x_i) T_f   and   dx_i = sum_f (c_f T_f . Y_i) dfeat_f(x_i)/dx_i.

    Non-causal: x = q', T = S gives U = O^ (outputs and denominators); x = q', T = S, Y = G^ gives
    dq'; x = k', T = R, Y = W^ gives dk' and U (then dV = w U[:d_v], dw = U . V^). CHUNKED (causal):
    T is the state of row i's chunk, T_c = S_<c (queries) or R_>c (keys), as _chunk_states_kernel
    stored it, and ACCUMULATE adds to what the in-chunk block kernels stored for the same rows (this
    program owns them: no atomics). The feature gradient of each slice is _feature_gradient's.

    Grid (BH G, cdiv(n_rows, BLOCK_N)): the G query heads of a key head share its state (groups =
    G; 1 for keys, and for non-causal queries, whose G heads are rows of one (BH, G n_q, .) block).
    The program loops over the chunks its rows fall in (one, unless a chunk is not a multiple of
    BLOCK_N) and the slices p, each a (D, DV) tile of T with its (D,) denominator column; rows
    x (BLOCK_N, D), Y (BLOCK_N, DV) + (BLOCK_N,). Per call: 2 n r (d_v + 1) FLOPs per product
    (U, and dx's T Y), reading x, Y once and T once per row block: n / BLOCK_N r (d_v + 1) floats.
    """
    head, block = _head_id(), tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    x_ptr += head * stride_x_head
    state_ptr += (head // groups) * stride_state_head
    x = _load_rows(x_ptr + rows[:, None] * stride_x_row, rows, row_mask, d, D)
    if GRADIENT:
        y_ptr += head * stride_y_head
        y_v = _load_rows(y_ptr + rows[:, None] * stride_y_row, rows, row_mask, d_v, DV)
        y_1 = tl.load(y_ptr + rows * stride_y_row + d_v, mask=row_mask, other=0.0).to(tl.float32)
    u_v = tl.zeros((BLOCK_N, DV), dtype=tl.float32)
    u_1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dx = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    if CHUNKED:
        first_chunk = block * BLOCK_N // chunk_size
        end_chunk = tl.minimum((block * BLOCK_N + BLOCK_N - 1) // chunk_size + 1, n_chunks)
    else:
        first_chunk = 0
        end_chunk = 1
    for chunk in range(first_chunk, end_chunk):
        # rows of other chunks contribute nothing to this chunk's products
        if CHUNKED:
            in_chunk = row_mask & (rows // chunk_size == chunk)
        else:
            in_chunk = row_mask
        chunk_state = state_ptr + chunk * stride_state_chunk
        x_c = tl.where(in_chunk[:, None], x, 0.0)
        if GRADIENT:
            y_v_c = tl.where(in_chunk[:, None], y_v, 0.0)
            y_1_c = tl.where(in_chunk, y_1, 0.0)
        for p in range(0, n_slices):
            a, b = _slice_factors(p, d, DEGREE, D1)
            coefficient = _slice_coefficient(a, b, d, C1, C2, C3)
            x_a, x_b = _load_multipliers(x_ptr + rows * stride_x_row, rows, row_mask, a, b, d)
            t_v, t_1 = _load_slice(chunk_state, p, d, d_v, D, DV)
            if STORE_U:
                features = (coefficient * x_a * x_b)[:, None] * x_c
                u_v += _dot(features, t_v, DOT_PRECISION)
                u_1 += tl.sum(features * t_1[None, :], axis=1)
            if GRADIENT:
                d_features = coefficient * (_dot(y_v_c, tl.trans(t_v), DOT_PRECISION)
                                            + y_1_c[:, None] * t_1[None, :])  # (BLOCK_N, D)
                dx += _feature_gradient(x_c, x_a, x_b, d_features, a, b, d, D)
        if STORE_U:
            t0_v, t0_1 = _load_constant(chunk_state, n_slices, d, d_v, DV)
            u_v += tl.where(in_chunk[:, None], C0 * t0_v[None, :], 0.0)
            u_1 += tl.where(in_chunk, C0 * tl.sum(t0_1, axis=0), 0.0)
    if STORE_U:
        u_ptr += head * stride_u_head
        u_v_ptrs = u_ptr + rows[:, None] * stride_u_row + values[None, :]
        u_v_mask = row_mask[:, None] & (values[None, :] < d_v)
        if ACCUMULATE:
            u_v += tl.load(u_v_ptrs, mask=u_v_mask, other=0.0)
            u_1 += tl.load(u_ptr + rows * stride_u_row + d_v, mask=row_mask, other=0.0)
        tl.store(u_v_ptrs, u_v, mask=u_v_mask)
        tl.store(u_ptr + rows * stride_u_row + d_v, u_1, mask=row_mask)
    if GRADIENT:
        dx_ptr += head * stride_dx_head
        dx_ptrs = dx_ptr + rows[:, None] * stride_dx_row + columns[None, :]
        dx_mask = row_mask[:, None] & (columns[None, :] < d)
        if ACCUMULATE:
            dx += tl.load(dx_ptrs, mask=dx_mask, other=0.0)
        tl.store(dx_ptrs, dx, mask=dx_mask)


@triton.jit
def _chunk_states_kernel(x_ptr, y_ptr, states_ptr, total_ptr, row_limit, groups, d, d_v, chunk_size, n_chunks,
                         n_slices, stride_x_head, stride_x_group, stride_x_row, stride_y_head, stride_y_group,
                         stride_y_row, stride_states_head, stride_states_chunk, stride_total_head,
                         BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr,
                         DEGREE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         REVERSE: tl.constexpr, STORE_TOTAL: tl.constexpr):
    """The state entering each chunk c of C rows, the only serial part of the causal kernels:

        forward   T_c = S_<c = sum_{j < c C} feat(x_j)^T Y_j     (x = k', Y = W^)
        REVERSE   T_c = R_>c = sum_{i >= (c + 1) C} feat(x_i)^T Y_i over every group (x = q', Y = G^)

    and, STORE_TOTAL, the state of every row (the forward's S). Rows stop at row_limit (min(n_q, n_k)
    for keys: no query sees a key past n_q). Grid (BH, n_slices): program (h, p) walks the chunks
    holding slice p, (D, DV) + (D,) in float32 registers (the last slice also the constant
    feature), stores it for each chunk before adding the chunk's rows x (BLOCK_N, D) with Y
    (BLOCK_N, DV) + (BLOCK_N,). Per call: 2 n r (d_v + 1) FLOPs; reads x, Y once per slice
    (n_slices n (d + d_v + 1) elements) and writes n_chunks r (d_v + 1) floats.
    """
    head, p = _head_id(), tl.program_id(1)
    a, b = _slice_factors(p, d, DEGREE, D1)
    x_ptr += head * stride_x_head
    y_ptr += head * stride_y_head
    states_ptr += head * stride_states_head
    slice_v = tl.zeros((D, DV), dtype=tl.float32)
    slice_1 = tl.zeros((D,), dtype=tl.float32)
    constant_v = tl.zeros((DV,), dtype=tl.float32)
    constant_1 = tl.zeros((1,), dtype=tl.float32)
    for step in range(0, n_chunks):
        if REVERSE:
            chunk = n_chunks - 1 - step
        else:
            chunk = step
        _store_slice(states_ptr + chunk * stride_states_chunk, p, n_slices, d, d_v, slice_v, slice_1, constant_v,
                     constant_1, D, DV)
        chunk_start = chunk * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, row_limit)
        for group in range(0, groups):
            for start in range(chunk_start, chunk_end, BLOCK_N):
                rows = start + tl.arange(0, BLOCK_N)
                row_mask = rows < chunk_end
                x_rows = x_ptr + group * stride_x_group + rows * stride_x_row
                x = _load_rows(x_rows[:, None], rows, row_mask, d, D)
                x_a, x_b = _load_multipliers(x_rows, rows, row_mask, a, b, d)
                y_rows = y_ptr + group * stride_y_group + rows * stride_y_row
                y_v = _load_rows(y_rows[:, None], rows, row_mask, d_v, DV)
                y_1 = tl.load(y_rows + d_v, mask=row_mask, other=0.0).to(tl.float32)
                slice_v, slice_1, constant_v, constant_1 = _add_rows_to_slice(
                    x, x_a, x_b, y_v, y_1, slice_v, slice_1, constant_v, constant_1, DOT_PRECISION)
    if STORE_TOTAL:
        _store_slice(total_ptr + head * stride_total_head, p, n_slices, d, d_v, slice_v, slice_1, constant_v,
                     constant_1, D, DV)


# ---- causal -------------------------------------------------------------------------------------
# Query position i sees key position j iff chunk(i) C <= j <= i inside the block, and every j of
# an earlier chunk through the state; keys at positions >= n_q are never seen (SDPA's top-left
# alignment, as in lrcompile.kernels.reference). Causal rows are laid out (BH, G, n, e).


@triton.jit
def _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION: tl.constexpr):
    """(X, visible) for a (BLOCK_M, BLOCK_N) tile: X = q' k'^T, visible the in-chunk causal mask."""
    scores = _dot(q, tl.trans(k), DOT_PRECISION)
    first = rows // chunk_size * chunk_size
    visible = ((keys[None, :] <= rows[:, None]) & (keys[None, :] >= first[:, None])
               & (keys[None, :] < n_k) & (rows[:, None] < n_q))
    return scores, visible


@triton.jit
def _polynomial(x, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """P(x) = c_0 + c_1 x + c_2 x^2 + c_3 x^3 (Horner); a zero c_3 is left out at compile time."""
    if C3 == 0.0:
        y = C0 + x * (C1 + x * C2)
    else:
        y = C0 + x * (C1 + x * (C2 + x * C3))
    return y


@triton.jit
def _polynomial_derivative(x, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """P'(x) = c_1 + 2 c_2 x + 3 c_3 x^2; a zero c_3 is left out at compile time."""
    if C3 == 0.0:
        y = C1 + x * (2.0 * C2)
    else:
        y = C1 + x * (2.0 * C2 + x * (3.0 * C3))
    return y


@triton.jit
def _block_forward_kernel(q_ptr, k_ptr, w_ptr, out_ptr, n_q, n_k, d, d_v, chunk_size,
                          stride_q_head, stride_q_group, stride_q_row, stride_k_head, stride_k_row,
                          stride_w_head, stride_w_row, stride_o_head, stride_o_group, stride_o_row,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """O^_i = sum_{chunk(i) C <= j <= i} P(q'_i . k'_j) W^_j: the in-chunk block, applied directly.

    Grid (BH, G, cdiv(n_q, BLOCK_M)). Per step: q (BLOCK_M, D), k (BLOCK_N, D), X and P(X)
    (BLOCK_M, BLOCK_N), W^ (BLOCK_N, DV) + (BLOCK_N,); the rows' keys start at their chunk's
    first position, so at most C + BLOCK_M keys are visited. Stores O^ (plain store: this kernel
    runs first and the chunked apply kernel adds the earlier chunks' share). Per call: at most
    2 G n_q (C + BLOCK_M) (d + d_v + 1) FLOPs on the visited tiles; reads q', O^ once and
    k', W^ (C + BLOCK_M) / BLOCK_M times.
    """
    head, group, block = _head_id(), tl.program_id(1), tl.program_id(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_q
    values = tl.arange(0, DV)
    q_ptr += head * stride_q_head + group * stride_q_group
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    q = _load_rows(q_ptr + rows[:, None] * stride_q_row, rows, row_mask, d, D)
    out_v = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    out_1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_key = block * BLOCK_M // chunk_size * chunk_size
    last_key = tl.minimum((block + 1) * BLOCK_M, n_k)
    for start in range(first_key, last_key, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < n_k
        k = _load_rows(k_ptr + keys[:, None] * stride_k_row, keys, key_mask, d, D)
        w_v = _load_rows(w_ptr + keys[:, None] * stride_w_row, keys, key_mask, d_v, DV)
        w_1 = tl.load(w_ptr + keys * stride_w_row + d_v, mask=key_mask, other=0.0).to(tl.float32)
        scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION)
        block_weights = tl.where(visible, _polynomial(scores, C0, C1, C2, C3), 0.0)
        out_v += _dot(block_weights, w_v, DOT_PRECISION)
        out_1 += tl.sum(block_weights * w_1[None, :], axis=1)
    out_ptr += head * stride_o_head + group * stride_o_group
    tl.store(out_ptr + rows[:, None] * stride_o_row + values[None, :], out_v,
             mask=row_mask[:, None] & (values[None, :] < d_v))
    tl.store(out_ptr + rows * stride_o_row + d_v, out_1, mask=row_mask)


@triton.jit
def _block_query_backward_kernel(q_ptr, k_ptr, w_ptr, g_ptr, dq_ptr, n_q, n_k, d, d_v, chunk_size,
                                 stride_q_head, stride_q_group, stride_q_row, stride_k_head, stride_k_row,
                                 stride_w_head, stride_w_row, stride_g_head, stride_g_group, stride_g_row,
                                 stride_dq_head, stride_dq_group, stride_dq_row,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr,
                                 C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """dq'_i = sum_{chunk(i) C <= j <= i} (G^_i . W^_j) P'(X_ij) k'_j: the in-chunk block's share of dq'.

    Grid (BH, G, cdiv(n_q, BLOCK_M)). Per step: q (BLOCK_M, D), G^ (BLOCK_M, DV) + (BLOCK_M,),
    k (BLOCK_N, D), W^ (BLOCK_N, DV) + (BLOCK_N,), dX (BLOCK_M, BLOCK_N). Plain store: runs before
    the chunked apply kernel. Per call: at most 2 G n_q (C + BLOCK_M) (2 d + d_v + 1) FLOPs.
    """
    head, group, block = _head_id(), tl.program_id(1), tl.program_id(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_q
    columns = tl.arange(0, D)
    q_ptr += head * stride_q_head + group * stride_q_group
    g_ptr += head * stride_g_head + group * stride_g_group
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    q = _load_rows(q_ptr + rows[:, None] * stride_q_row, rows, row_mask, d, D)
    g_v = _load_rows(g_ptr + rows[:, None] * stride_g_row, rows, row_mask, d_v, DV)
    g_1 = tl.load(g_ptr + rows * stride_g_row + d_v, mask=row_mask, other=0.0).to(tl.float32)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    first_key = block * BLOCK_M // chunk_size * chunk_size
    last_key = tl.minimum((block + 1) * BLOCK_M, n_k)
    for start in range(first_key, last_key, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < n_k
        k = _load_rows(k_ptr + keys[:, None] * stride_k_row, keys, key_mask, d, D)
        w_v = _load_rows(w_ptr + keys[:, None] * stride_w_row, keys, key_mask, d_v, DV)
        w_1 = tl.load(w_ptr + keys * stride_w_row + d_v, mask=key_mask, other=0.0).to(tl.float32)
        scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION)
        d_weights = _dot(g_v, tl.trans(w_v), DOT_PRECISION) + g_1[:, None] * w_1[None, :]
        d_scores = tl.where(visible, d_weights * _polynomial_derivative(scores, C1, C2, C3), 0.0)
        dq += _dot(d_scores, k, DOT_PRECISION)
    dq_ptr += head * stride_dq_head + group * stride_dq_group
    tl.store(dq_ptr + rows[:, None] * stride_dq_row + columns[None, :], dq,
             mask=row_mask[:, None] & (columns[None, :] < d))


@triton.jit
def _block_key_backward_kernel(q_ptr, k_ptr, w_ptr, g_ptr, dk_ptr, u_ptr, n_q, n_k, groups, d, d_v, chunk_size,
                               stride_q_head, stride_q_group, stride_q_row, stride_k_head,
                               stride_k_row, stride_w_head, stride_w_row, stride_g_head, stride_g_group, stride_g_row,
                               stride_dk_head, stride_dk_row, stride_u_head, stride_u_row,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                               DOT_PRECISION: tl.constexpr,
                               C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """dk'_j = sum_i (G^_i . W^_j) P'(X_ij) q'_i   and   U_j = sum_i P(X_ij) G^_i   over the block's
    queries i (every group, j <= i < end of chunk(j)): the in-chunk block's share of dk' and U.

    Grid (BH, cdiv(n_k, BLOCK_N)). Per step: k (BLOCK_N, D), W^ (BLOCK_N, DV) + (BLOCK_N,) held;
    q (BLOCK_M, D), G^ (BLOCK_M, DV) + (BLOCK_M,), X (BLOCK_M, BLOCK_N). Plain store: keys no
    query sees (j >= n_q) get zeros. Per call: at most 2 G n_k (C + BLOCK_N) (2 d + 2 d_v + 2) FLOPs.
    """
    head, block = _head_id(), tl.program_id(1)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_mask = keys < n_k
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    q_ptr += head * stride_q_head
    g_ptr += head * stride_g_head
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    k = _load_rows(k_ptr + keys[:, None] * stride_k_row, keys, key_mask, d, D)
    w_v = _load_rows(w_ptr + keys[:, None] * stride_w_row, keys, key_mask, d_v, DV)
    w_1 = tl.load(w_ptr + keys * stride_w_row + d_v, mask=key_mask, other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    u_v = tl.zeros((BLOCK_N, DV), dtype=tl.float32)
    u_1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = block * BLOCK_N
    last_row = tl.minimum(((block + 1) * BLOCK_N - 1) // chunk_size * chunk_size + chunk_size, n_q)
    for group in range(0, groups):
        for start in range(first_row, last_row, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < n_q
            q = _load_rows(q_ptr + group * stride_q_group + rows[:, None] * stride_q_row, rows, row_mask, d, D)
            g_rows = g_ptr + group * stride_g_group + rows * stride_g_row
            g_v = _load_rows(g_rows[:, None], rows, row_mask, d_v, DV)
            g_1 = tl.load(g_rows + d_v, mask=row_mask, other=0.0).to(tl.float32)
            scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION)
            block_weights = tl.where(visible, _polynomial(scores, C0, C1, C2, C3), 0.0)
            d_weights = _dot(g_v, tl.trans(w_v), DOT_PRECISION) + g_1[:, None] * w_1[None, :]
            d_scores = tl.where(visible, d_weights * _polynomial_derivative(scores, C1, C2, C3), 0.0)
            dk += _dot(tl.trans(d_scores), q, DOT_PRECISION)
            u_v += _dot(tl.trans(block_weights), g_v, DOT_PRECISION)
            u_1 += tl.sum(block_weights * g_1[:, None], axis=0)
    dk_ptr += head * stride_dk_head
    tl.store(dk_ptr + keys[:, None] * stride_dk_row + columns[None, :], dk,
             mask=key_mask[:, None] & (columns[None, :] < d))
    u_ptr += head * stride_u_head
    tl.store(u_ptr + keys[:, None] * stride_u_row + values[None, :], u_v,
             mask=key_mask[:, None] & (values[None, :] < d_v))
    tl.store(u_ptr + keys * stride_u_row + d_v, u_1, mask=key_mask)


# ---- launchers ----------------------------------------------------------------------------------
# `forward` and `backward` are what the ops below call, and what the tests call directly (under
# TRITON_INTERPRET=1 on CPU tensors). Every tensor a kernel sees is contiguous with heads
# flattened: rows (BH, n, e); the G query heads of a key head are G n_q consecutive rows when
# non-causal (any split into blocks will do) and a (BH, G, n_q, e) block when causal.


def _launcher(kernel):
    """wrap_triton(kernel), which leaves an interpreted kernel (TRITON_INTERPRET=1) as it is; such a
    kernel is then not launched on fake tensors. Under FakeTensorMode a triton_op runs as its own
    fake kernel, where a compiled kernel's launch is traced and does nothing, but the interpreter
    would read the fake tensors' data."""
    wrapped = wrap_triton(kernel)
    if wrapped is not kernel:
        return wrapped
    return _SkipsFakeTensors(kernel)


class _SkipsFakeTensors:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if any(isinstance(arg, torch.Tensor) and (is_fake(arg) or arg.device.type == "meta") for arg in args):
                return None
            return self.kernel[grid](*args, **kwargs)
        return launch


CUDA_MIN_CHUNK = 256


def kernel_chunk(chunk_size: int, device: torch.device, tuned_chunk: int | None = None) -> int:
    """The causal kernels' chunk C: the site's chunk_size, and on CUDA at least the chunk timed best
    on this GPU (lrcompile.kernels.triton_tuning), else CUDA_MIN_CHUNK rows.

    Any C computes the same function (the in-chunk block P(q'.k') equals phi(q') psi(k') exactly),
    so C only trades the block's O(n C d) work against the per-chunk states, n / C of them, each
    r (d_v + 1) float32 (d = 64, degree 2: 0.54 MB): at n = 65536 a 64-row chunk would store 1.1 GB
    per head, 256 rows 0.28 GB; power-attention and fla chunk as coarsely on GPUs.
    """
    return max(chunk_size, tuned_chunk or CUDA_MIN_CHUNK) if device.type == "cuda" else chunk_size


def _tuned(q, degree: int, causal: bool) -> dict | None:
    if q.device.type != "cuda":
        return None
    return triton_tuning.choice(q.shape[-1], degree, q.dtype, causal, _device_name(q.device.index))


@functools.cache
def _device_name(index) -> str:
    return torch.cuda.get_device_name(index)


def _interpreted() -> bool:
    """Whether the kernels run under TRITON_INTERPRET=1 (set before triton was imported)."""
    return not isinstance(_state_kernel, triton.runtime.JITFunction)


def _tile(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _block_size(device: torch.device, head_dim: int, value_dim: int) -> int:
    """Rows per tile. Under the interpreter (CPU tensors) 16: it runs every program in Python.

    On CUDA, 64, or 32 past d or d_v = 64: the state kernels hold (D, DV) float32 state slices in
    registers, and compiled for sm_90 they spill at 64-row tiles once D or DV is 128.
    """
    if device.type != "cuda":
        return 16
    return 64 if max(head_dim, value_dim) <= 64 else 32


@dataclass(frozen=True)
class _Launch:
    """One call's kernel configuration: sizes, the polynomial c_0..c_3 (zero-padded), tiles."""

    head_dim: int
    value_dim: int
    degree: int
    coefficients: tuple[float, float, float, float]
    block: int
    dot_precision: str
    tuned_chunk: int | None = None  # the causal chunk timed best on this GPU (lrcompile.kernels.triton_tuning)

    @classmethod
    def of(cls, q, v, coefficients, block_size=None, causal=False):
        """The launch of one call; on CUDA with the tiles timed best on this GPU, where recorded."""
        degree = len(coefficients) - 1
        padded = tuple(float(c) for c in coefficients) + (0.0,) * (MAX_DEGREE - degree)
        precision = DOT_PRECISION_FOR_DTYPE[q.dtype]
        if precision == "bf16" and _interpreted():
            # the interpreter (Triton 3.9) multiplies bfloat16 tiles as raw integers; bfloat16 values
            # multiply exactly in float32, so rounding the operands and taking a float32 product is
            # the tensor cores' bfloat16 product with float32 accumulation
            precision = "bf16_in_fp32"
        tuned = _tuned(q, degree, causal) or {}
        return cls(q.shape[-1], v.shape[-1], degree, padded,
                   block_size or tuned.get("block") or _block_size(q.device, q.shape[-1], v.shape[-1]), precision,
                   tuned.get("chunk"))

    @property
    def n_slices(self) -> int:
        return slice_count(self.head_dim, self.degree)

    def constants(self, rows_only=False) -> dict:
        """The kernels' constexpr arguments (the slice kernels take BLOCK_N only, the causal ones BLOCK_M too)."""
        tiles = dict(BLOCK_N=self.block, D=_tile(self.head_dim), DV=_tile(self.value_dim),
                     DOT_PRECISION=self.dot_precision)
        return tiles if rows_only else dict(tiles, BLOCK_M=self.block)

    def polynomial(self) -> dict:
        """c_0..c_3 as the kernels' constexpr arguments C0..C3: a Python float argument would be typed
        fp64 by Inductor (and then meet float32 operands in tl.dot), so each polynomial compiles its own
        kernels instead, in which a zero c_3 folds away."""
        return dict(zip(("C0", "C1", "C2", "C3"), self.coefficients))

    def slice_constants(self, rows_only=False) -> dict:
        """constants() plus what the slice enumeration needs."""
        return dict(self.constants(rows_only), D1=triton.next_power_of_2(self.head_dim + 1),
                    DEGREE=3 if self.degree == 3 else 2)


def _features_state(x, y, launch: _Launch):
    """T = sum_j feat(x_j)^T Y_j for rows x (BH, n, d), Y (BH, n, d_v + 1): (BH, state_rows, d_v + 1).

    The rows are split across programs (_rows_per_split) and the partial states added here."""
    heads, n = x.shape[:2]
    d, d_v = launch.head_dim, launch.value_dim
    rows_per_split = _rows_per_split(n, heads * launch.n_slices, launch.block, x.device)
    splits = triton.cdiv(n, rows_per_split)
    partial = x.new_empty(heads, splits, state_rows(d, launch.degree), d_v + 1, dtype=torch.float32)
    _launcher(_state_kernel)[(heads, launch.n_slices, splits)](
        x, y, partial, n, d, d_v, launch.n_slices, rows_per_split,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), partial.stride(0), partial.stride(1),
        **launch.slice_constants(rows_only=True))
    return partial[:, 0] if splits == 1 else partial.sum(1)


# Splits of n in the non-causal state kernel: enough programs to fill a GPU several times over
# (B H n_slices alone is 8 x 65 = 520 at H = 8, d = 64), each at least a few thousand rows long so
# the partial states (splits r (d_v + 1) floats) stay small against the rows read.
PROGRAMS_TO_FILL = 4 * 132  # four waves of an H100/H200's SMs
MIN_ROWS_PER_SPLIT = 2048
INTERPRETED_ROWS_PER_SPLIT = 32  # small enough that the tests' short sequences take the split path


def _rows_per_split(n: int, programs: int, block: int, device: torch.device) -> int:
    """Rows each state program sums: n, or less where B H n_slices programs would leave SMs idle."""
    if device.type == "cuda":
        splits = min(triton.cdiv(PROGRAMS_TO_FILL, programs), triton.cdiv(n, MIN_ROWS_PER_SPLIT))
    else:
        splits = triton.cdiv(n, INTERPRETED_ROWS_PER_SPLIT)
    return block * max(1, triton.cdiv(triton.cdiv(n, max(1, splits)), block))


def _apply_state(x, state, y, launch: _Launch, store_u=True, gradient=False, groups=1, chunk_size=None,
                 u=None, dx=None):
    """(U (BH G, n, d_v + 1) or None, dx (BH G, n, d) or None) for rows x (BH G, n, d) against state T.

    T is (BH, rows, d_v + 1), or per chunk (BH, n_chunks, rows, d_v + 1) where chunk_size is given
    (causal: row i takes its chunk's state). Given `u` or `dx`, the results are added to them.
    """
    heads, n = x.shape[:2]
    d, d_v = launch.head_dim, launch.value_dim
    accumulate = u is not None or dx is not None
    if store_u and u is None:
        u = x.new_empty(heads, n, d_v + 1, dtype=torch.float32)
    if gradient and dx is None:
        dx = x.new_empty(heads, n, d, dtype=torch.float32)
    u_arg = u if store_u else x.new_empty(0, 1, 1)
    dx_arg = dx if gradient else x.new_empty(0, 1, 1)
    y = y if gradient else x  # unread without GRADIENT: any tensor will do as the pointer
    chunked = chunk_size is not None
    n_chunks, chunk_stride = (state.shape[1], state.stride(1)) if chunked else (1, 0)
    _launcher(_apply_state_kernel)[(heads, triton.cdiv(n, launch.block))](
        x, state, y, u_arg, dx_arg, n, d, d_v, launch.n_slices, groups, chunk_size or 1, n_chunks,
        x.stride(0), x.stride(1), state.stride(0), chunk_stride, y.stride(0), y.stride(1),
        u_arg.stride(0), u_arg.stride(1), dx_arg.stride(0), dx_arg.stride(1),
        **launch.slice_constants(rows_only=True), **launch.polynomial(), STORE_U=store_u, GRADIENT=gradient,
        CHUNKED=chunked, ACCUMULATE=accumulate)
    return (u if store_u else None), (dx if gradient else None)


def _chunk_states(x, y, n_q, launch: _Launch, chunk_size, reverse=False, total=None):
    """The state entering each chunk of C query positions, (BH, cdiv(n_q, C), rows, d_v + 1):
    S_<c of rows x (BH, G, n, d), Y (BH, G, n, d_v + 1), or R_>c with reverse. Writes the state of
    every row into `total` (BH, rows, d_v + 1) where given."""
    heads, groups, n = x.shape[:3]
    d, d_v = launch.head_dim, launch.value_dim
    states = x.new_empty(heads, triton.cdiv(n_q, chunk_size), state_rows(d, launch.degree), d_v + 1,
                         dtype=torch.float32)
    total_arg = total if total is not None else states
    _launcher(_chunk_states_kernel)[(heads, launch.n_slices)](
        x, y, states, total_arg, min(n_q, n), groups, d, d_v, chunk_size, states.shape[1], launch.n_slices,
        *x.stride()[:3], *y.stride()[:3], states.stride(0), states.stride(1), total_arg.stride(0),
        **launch.slice_constants(rows_only=True), REVERSE=reverse, STORE_TOTAL=total is not None)
    return states


def _prepare(q, k, v, key_weight, scale, causal):
    """q' (B, H, G, n_q, d), k' (B, H, n_k, d), W^ = w [V | 1] (B, H, n_k, d_v + 1) in the inputs' dtype,
    which the kernels' tile products take as they are; with the valid-key mask and count (float32)
    that the centring's gradient needs (as operands.centre_keys returns them).

    No float32 copy of a half input is made: the key mean is summed in float32 by the reduction
    itself, and each of q', k', W^ is rounded once to the inputs' dtype.
    """
    root_scale = scale**0.5
    k_scaled = k * root_scale
    valid = valid_count = None
    if causal:
        centred = k_scaled
    elif key_weight is None:
        centred = k_scaled - k_scaled.sum(-2, keepdim=True, dtype=torch.float32).div(k.shape[-2]).to(k.dtype)
    else:
        valid = (key_weight > 0).unsqueeze(-1)  # (B, H, n_k, 1)
        valid_count = valid.sum(-2, keepdim=True, dtype=torch.float32).clamp_min(1)
        mean = torch.where(valid, k_scaled, 0).sum(-2, keepdim=True, dtype=torch.float32) / valid_count
        centred, valid = k_scaled - mean.to(k.dtype), valid.float()
    weighted = _weighted(_append_ones(v), key_weight)
    return (q * root_scale).contiguous(), centred.contiguous(), weighted.contiguous(), valid, valid_count


def forward(q, k, v, key_weight, coefficients, scale, causal, chunk_size, block_size=None):
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state): factored_attention's values.

    The state is (B, H, state_rows(d, degree), d_v + 1) in the slice layout, or reference.py's
    where the call falls back to the torch sweep (`supports` is False).
    """
    if not supports(q, v, coefficients):
        out, denominator, state, _ = torch.ops.lrcompile.factored_attention(
            q, k, v, key_weight, list(coefficients), scale, causal, chunk_size, 0.0, "allow", "triton-fallback")
        return out, denominator, state
    batch, heads, groups, n_q, d = q.shape
    d_v = v.shape[-1]
    launch = _Launch.of(q, v, coefficients, block_size, causal)
    q_rows, k_rows, weighted, _, _ = _prepare(q, k, v, key_weight, scale, causal)
    q_rows, k_rows, weighted = q_rows.flatten(0, 1), k_rows.flatten(0, 1), weighted.flatten(0, 1)
    if causal:
        chunk = kernel_chunk(chunk_size, q.device, launch.tuned_chunk)
        out_hat, state = _causal_forward(q_rows, k_rows, weighted, launch, chunk)
    else:
        state = _features_state(k_rows, weighted, launch)
        out_hat = _apply_state(q_rows.flatten(1, 2), state, None, launch)[0]
    out_hat = out_hat.reshape(batch, heads, groups, n_q, d_v + 1)
    denominator = out_hat[..., d_v]
    out = out_hat[..., :d_v] / denominator.unsqueeze(-1)
    return out.to(q.dtype), denominator.contiguous(), state.unflatten(0, (batch, heads))


def _causal_forward(q_rows, k_rows, weighted, launch: _Launch, chunk_size):
    """O^ (BH, G, n_q, d_v + 1) and the state of all keys j < min(n_q, n_k), for q' (BH, G, n_q, d)."""
    heads, groups, n_q = q_rows.shape[:3]
    n_k = k_rows.shape[1]
    d, d_v = launch.head_dim, launch.value_dim
    out_hat = q_rows.new_empty(heads, groups, n_q, d_v + 1, dtype=torch.float32)
    state = q_rows.new_empty(heads, state_rows(d, launch.degree), d_v + 1, dtype=torch.float32)
    strides = (*q_rows.stride()[:3], *k_rows.stride()[:2], *weighted.stride()[:2], *out_hat.stride()[:3])
    _launcher(_block_forward_kernel)[(heads, groups, triton.cdiv(n_q, launch.block))](
        q_rows, k_rows, weighted, out_hat, n_q, n_k, d, d_v, chunk_size, *strides,
        **launch.constants(), **launch.polynomial())
    # the in-chunk block stored O^; each query row adds phi(q'_i) S_<c of its chunk c
    states = _chunk_states(k_rows.unsqueeze(1), weighted.unsqueeze(1), n_q, launch, chunk_size, total=state)
    _apply_state(q_rows.flatten(0, 1), states, None, launch, groups=groups, chunk_size=chunk_size,
                 u=out_hat.flatten(0, 1))
    return out_hat, state


def backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale, causal, chunk_size,
             key_weight_grad, block_size=None):
    """(dq, dk, dv, d key_weight): factored_attention_backward's values; the last is empty unless key_weight_grad.

    `out`, `denominator` and `state` are what `forward` returned for the same inputs.
    """
    if not supports(q, v, coefficients):
        return torch.ops.lrcompile.factored_attention_backward(
            grad_out, q, k, v, key_weight, out, denominator, state, q.new_zeros((), dtype=torch.bool),
            list(coefficients), scale, causal, chunk_size, key_weight_grad)
    batch, heads, groups, n_q, d = q.shape
    d_v = v.shape[-1]
    launch = _Launch.of(q, v, coefficients, block_size, causal)
    q_rows, k_rows, weighted, valid, valid_count = _prepare(q, k, v, key_weight, scale, causal)
    # G^_i = [dO_i | -(dO_i . out_i)] / D_i  (B, H, G, n_q, d_v + 1), rounded to the inputs' dtype once
    # (dO . out summed in float32: it is the difference the gradient of the normalisation takes)
    row_dot = (grad_out * out).sum(-1, keepdim=True, dtype=torch.float32)
    g_hat = (torch.cat([grad_out / denominator.unsqueeze(-1), -row_dot / denominator.unsqueeze(-1)], dim=-1)
             .to(q.dtype))
    q_rows, g_rows = q_rows.flatten(0, 1), g_hat.contiguous().flatten(0, 1)
    k_rows, weighted, state = k_rows.flatten(0, 1), weighted.flatten(0, 1), state.flatten(0, 1).contiguous()
    if causal:
        dq, dk, key_grads = _causal_backward(q_rows, k_rows, weighted, g_rows, state, launch,
                                             kernel_chunk(chunk_size, q.device, launch.tuned_chunk))
    else:
        query_state = _features_state(q_rows.flatten(1, 2), g_rows.flatten(1, 2), launch)  # R
        dq = _apply_state(q_rows.flatten(1, 2), state, g_rows.flatten(1, 2), launch, store_u=False, gradient=True)[1]
        key_grads, dk = _apply_state(k_rows, query_state, weighted, launch, gradient=True)
    dq = dq.reshape(batch, heads, groups, n_q, d)
    dk, key_grads = dk.unflatten(0, (batch, heads)), key_grads.unflatten(0, (batch, heads))
    if not causal:
        dk = dk - _valid_mean_correction(dk, valid, valid_count)
    # U_j: dV_j = w_j U_j[:d_v], dw_j = U_j . V^_j
    dv = _weighted(key_grads[..., :d_v], key_weight)
    dw = (key_grads * _append_ones(v)).sum(-1).to(key_weight.dtype) if key_weight_grad else q.new_empty(0)
    root_scale = scale**0.5
    return (dq * root_scale).to(q.dtype), (dk * root_scale).to(k.dtype), dv.to(v.dtype), dw


def _causal_backward(q_rows, k_rows, weighted, g_rows, state, launch: _Launch, chunk_size):
    """dq' (BH, G, n_q, d), dk' (BH, n_k, d), U (BH, n_k, d_v + 1): the block kernels store, the
    chunked apply kernels add the other chunks' share (no atomics)."""
    heads, groups, n_q = q_rows.shape[:3]
    n_k = k_rows.shape[1]
    d, d_v = launch.head_dim, launch.value_dim
    dq = torch.empty_like(q_rows, dtype=torch.float32)
    dk = torch.empty_like(k_rows, dtype=torch.float32)
    key_grads = k_rows.new_empty(heads, n_k, d_v + 1, dtype=torch.float32)
    inputs = (*q_rows.stride()[:3], *k_rows.stride()[:2], *weighted.stride()[:2], *g_rows.stride()[:3])
    _launcher(_block_query_backward_kernel)[(heads, groups, triton.cdiv(n_q, launch.block))](
        q_rows, k_rows, weighted, g_rows, dq, n_q, n_k, d, d_v, chunk_size,
        *inputs, *dq.stride()[:3], **launch.constants(), **launch.polynomial())
    _launcher(_block_key_backward_kernel)[(heads, triton.cdiv(n_k, launch.block))](
        q_rows, k_rows, weighted, g_rows, dk, key_grads, n_q, n_k, groups, d, d_v, chunk_size,
        *inputs, *dk.stride()[:2], *key_grads.stride()[:2], **launch.constants(), **launch.polynomial())
    # the block kernels stored their shares; the earlier chunks' keys (S_<c, recomputed) add to dq',
    # the later chunks' queries (R_>c) to dk' and U
    key_states = _chunk_states(k_rows.unsqueeze(1), weighted.unsqueeze(1), n_q, launch, chunk_size)
    query_states = _chunk_states(q_rows, g_rows, n_q, launch, chunk_size, reverse=True)
    _apply_state(q_rows.flatten(0, 1), key_states, g_rows.flatten(0, 1), launch, store_u=False, gradient=True,
                 groups=groups, chunk_size=chunk_size, dx=dq.flatten(0, 1))
    _apply_state(k_rows, query_states, weighted, launch, gradient=True, chunk_size=chunk_size, u=key_grads, dx=dk)
    return dq, dk, key_grads


# ---- the ops ------------------------------------------------------------------------------------
# Registered with torch.library.triton_op so that under torch.compile Inductor sees the kernels
# themselves (wrap_triton) beside the Triton it generates for the rest of the model. They are
# for CUDA sites only: under torch.compile a triton_op is decomposed into its kernels whatever
# the device, and Inductor cannot run user Triton kernels on the CPU, so the rewrite must pick
# `lrcompile::factored_attention` for CPU sites (docs/design.md §6). No CPU kernel is registered here.
# Eagerly, and under TRITON_INTERPRET=1 on CPU tensors, the op runs `forward`/`backward` above.


@triton_op("lrcompile::triton_factored_attention", mutates_args=())
def triton_factored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state (B, H, state_rows(d, degree), d_v + 1))."""
    out, denominator, state = forward(q, k, v, key_weight, coefficients, scale, causal, chunk_size)
    return out.contiguous(), denominator.contiguous(), state.contiguous()


@triton_op("lrcompile::triton_factored_attention_backward", mutates_args=())
def triton_factored_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    out: torch.Tensor, denominator: torch.Tensor, state: torch.Tensor,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int, key_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d key_weight); the last is empty unless key_weight_grad."""
    grads = backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale, causal,
                     chunk_size, key_weight_grad)
    return tuple(g.contiguous() for g in grads)


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, coefficients, scale, causal, chunk_size = inputs
    out, denominator, state = output
    ctx.save_for_backward(q, k, v, key_weight, out, denominator, state)
    ctx.config = (list(coefficients), scale, causal, chunk_size)
    ctx.mark_non_differentiable(denominator, state)


def _backward(ctx, grad_out, _grad_denominator, _grad_state):
    q, k, v, key_weight, out, denominator, state = ctx.saved_tensors
    key_weight_grad = key_weight is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dw = torch.ops.lrcompile.triton_factored_attention_backward(
        grad_out, q, k, v, key_weight, out, denominator, state, *ctx.config, key_weight_grad)
    return dq, dk, dv, (dw if key_weight_grad else None), None, None, None, None


triton_factored_attention.register_autograd(_backward, setup_context=_setup_context)


class TritonKernels:
    """The kernel interface (lrcompile.kernels.interface.Kernels) over the ops above, differentiable.

    No direct algorithm here: `direct` is ignored, and the state says the factored one ran.
    """

    @staticmethod
    def forward(q, k, v, key_weight, config, scale, causal, direct=False):
        return torch.ops.lrcompile.triton_factored_attention(
            q, k, v, key_weight, list(config.coefficients), scale, causal, config.chunk_size)

    @staticmethod
    def backward(grad_out, q, k, v, key_weight, out, denominator, state, config, scale, causal, direct,
                 key_weight_grad):
        return torch.ops.lrcompile.triton_factored_attention_backward(
            grad_out, q, k, v, key_weight, out, denominator, state, list(config.coefficients), scale, causal,
            config.chunk_size, key_weight_grad)
