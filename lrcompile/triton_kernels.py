"""Triton kernels for the factored attention at degree <= 2: what `lrcompile::factored_attention`
and `lrcompile::factored_attention_backward` compute, as `lrcompile::triton_factored_attention`
and `lrcompile::triton_factored_attention_backward`.

Inputs as in lrcompile.factored: q (B, H, G, n_q, d), k (B, H, n_k, d), v (B, H, n_k, d_v),
key_weight (B, H, n_k) or None, coefficients c_0..c_g, scale, causal, chunk_size. The keys are
centred (k' = sqrt(s) k - mu, non-causal) and q' = sqrt(s) q is formed in torch around the
kernels, as factored.py does; the kernels run the sweeps. The accuracy guard (lrcompile.guard)
is not part of these ops: it reads data, so the caller composes it.

Features at degree 2, full layout.  P(q'.k') = c_0 + c_1 q'.k' + c_2 (q'.k')^2 and
(q'.k')^2 = sum_{a,b} q'_a q'_b k'_a k'_b over ordered pairs (a, b), so no multinomial weights:
feature (a, b) of a row x is m_a(x) x_b with m_a(x) = x_a for a < d (degree 2) and m_d(x) = 1
(degree 1), plus the constant feature 1 (degree 0); its coefficient c_f is c_2, c_1 or c_0.
A tile of features is then m_a(x) times the tile x itself for one a: no feature tensor ever
reaches global memory, and the state is built a-slice by a-slice.

The state layout (what the forward returns and the backward consumes; not factored.py's
symmetric r = C(d+2, 2) layout): S (B, H, d (d+1) + 1, d_v + 1), row a d + b holding feature
(a, b) for a in [0, d], b in [0, d), the last row the constant feature; columns [W^ = w V | w]
summed over keys, the last column the denominator's. r_full = d^2 + d + 1 (d = 64: 4161 rows
against 2145 symmetric ones); the kernels trade that factor < 2 for features formed by one
broadcast multiply. Coefficients are never stored in a state: they are applied where a state is
contracted with query features (phi carries the coefficients, psi none, as in lrcompile.features).

Kernels (grid, tile shapes in each kernel's docstring):

    non-causal  _state_kernel          T = sum_j feat(x_j)^T Y_j           S from keys, R from queries
                _apply_state_kernel    U_i = sum_f c_f feat_f(x_i) T_f,    dx_i from dfeat = c T Y_i
    causal      _block_forward_kernel  in-chunk C x C block P(X) masked, applied directly
                _sweep_forward_kernel  running state across chunks, one a-slice per program
                _block_query_backward_kernel / _block_key_backward_kernel   in-chunk block's gradients
                _sweep_backward_kernel reverse sweep: S peeled, R grown, one a-slice per program

The causal sweeps give one program the a-slice of the state for every chunk in turn, so their
contributions to rows (outputs, dq, dk, U) are reduced over the d + 1 slices with atomic adds
into float32 buffers that the in-chunk kernels initialised with plain stores. Everything
accumulates in float32, tile products as DOT_PRECISION says; float16/bfloat16 inputs are upcast
to float32 in torch before the kernels (an O(n d) copy) and the results cast back.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/test_triton_kernels.py
calls `forward` and `backward` below directly). Fallback to the torch sweep (lrcompile.factored):
degree > 2 (degree 3 at d <= 32 and beyond are not written yet), d or d_v > 128, and float64
inputs (the kernels accumulate in float32). Degrees 0 and 1 run the degree-2 kernels with c_2 = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lrcompile.factored import _append_ones, _valid_mean_correction, _weighted, centre_keys

MAX_DEGREE = 2
MAX_HEAD_DIM = 128
# Products of float32 tiles: "tf32x3" (three tf32 tensor-core products, float32-accurate to a few
# ulps) keeps them on tensor cores; "ieee" would fall back to FMA loops that spill at these tiles.
DOT_PRECISION: tl.constexpr = tl.constexpr("tf32x3")


def supports(q: torch.Tensor, v: torch.Tensor, coefficients) -> bool:
    """True where the Triton kernels run this call; elsewhere `forward`/`backward` fall back to the torch sweep."""
    return (len(coefficients) - 1 <= MAX_DEGREE and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16))


# ---- kernels ------------------------------------------------------------------------------------
# Shared notation: D >= d and DV >= d_v are the padded (power of two, >= 16 for tl.dot) tile
# widths; Y is a (rows, d_v + 1) operand ([w V | w] or G^) whose first d_v columns are loaded as a
# (rows, DV) tile and whose last column as a vector, so DV need not cover d_v + 1. Padded columns
# and rows load as zero, so they add nothing to any product. A scalar condition in a mask is
# broadcast to the vector first (`rows * 0 + a < d`): the interpreter rejects scalar & vector masks.


@triton.jit
def _load_rows(ptr, rows, row_mask, width, WIDTH: tl.constexpr):
    """A (rows, WIDTH) float32 tile of a row-major matrix with `width` columns (row stride given in ptr math)."""
    columns = tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (columns[None, :] < width)
    return tl.load(ptr + columns[None, :], mask=mask, other=0.0).to(tl.float32)


# A state (BH, d (d + 1) + 1, d_v + 1) is read and written one a-slice at a time: rows a d + b,
# b < d, as a (D, DV) value tile and its (D,) denominator column; the constant row separately.


@triton.jit
def _load_slice(state_ptr, a, d, d_v, D: tl.constexpr, DV: tl.constexpr):
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    feature_rows = (a * d + columns) * (d_v + 1)
    slice_v = tl.load(state_ptr + feature_rows[:, None] + values[None, :],
                      mask=(columns[:, None] < d) & (values[None, :] < d_v), other=0.0)
    slice_1 = tl.load(state_ptr + feature_rows + d_v, mask=columns < d, other=0.0)
    return slice_v, slice_1


@triton.jit
def _load_constant(state_ptr, d, d_v, DV: tl.constexpr):
    values = tl.arange(0, DV)
    constant_row = state_ptr + d * (d + 1) * (d_v + 1)
    return (tl.load(constant_row + values, mask=values < d_v, other=0.0),
            tl.load(constant_row + d_v + tl.arange(0, 1)))


@triton.jit
def _store_slice(state_ptr, a, d, d_v, slice_v, slice_1, constant_v, constant_1, D: tl.constexpr, DV: tl.constexpr):
    """Slice a; the program with a = d also writes the constant row."""
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    feature_rows = (a * d + columns) * (d_v + 1)
    tl.store(state_ptr + feature_rows[:, None] + values[None, :], slice_v,
             mask=(columns[:, None] < d) & (values[None, :] < d_v))
    tl.store(state_ptr + feature_rows + d_v, slice_1, mask=columns < d)
    constant_row = state_ptr + d * (d + 1) * (d_v + 1)
    tl.store(constant_row + values, constant_v, mask=(values < d_v) & (values * 0 + a == d))
    tl.store(constant_row + d_v + tl.arange(0, 1), constant_1, mask=tl.arange(0, 1) + a == d)


@triton.jit
def _state_kernel(x_ptr, y_ptr, state_ptr, n_rows, d, d_v,
                  stride_x_head, stride_x_row, stride_y_head, stride_y_row, stride_state_head,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """T_(a,b) = sum_j m_a(x_j) x_jb Y_j  and  T_1 = sum_j Y_j   (no coefficients).

    Grid (BH, d + 1): program (h, a) writes rows a d .. a d + d - 1 of head h's state (and
    a = d also the constant row). Per step: x (BLOCK_N, D), m_a (BLOCK_N,), Y (BLOCK_N, DV) + (BLOCK_N,);
    the accumulator is the (D, DV) slice and its (D,) denominator column, in registers.
    """
    head, a = tl.program_id(0), tl.program_id(1)
    x_ptr += head * stride_x_head
    y_ptr += head * stride_y_head
    slice_v = tl.zeros((D, DV), dtype=tl.float32)
    slice_1 = tl.zeros((D,), dtype=tl.float32)
    constant_v = tl.zeros((DV,), dtype=tl.float32)
    constant_1 = tl.zeros((1,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        x = _load_rows(x_ptr + rows[:, None] * stride_x_row, rows, row_mask, d, D)
        m = tl.load(x_ptr + rows * stride_x_row + a, mask=row_mask & (rows * 0 + a < d), other=1.0).to(tl.float32)
        y_v = _load_rows(y_ptr + rows[:, None] * stride_y_row, rows, row_mask, d_v, DV)
        y_1 = tl.load(y_ptr + rows * stride_y_row + d_v, mask=row_mask, other=0.0).to(tl.float32)
        features = m[:, None] * x  # (BLOCK_N, D): features (a, 0..d-1) of these rows
        slice_v += tl.dot(tl.trans(features), y_v, input_precision=DOT_PRECISION)
        slice_1 += tl.sum(features * y_1[:, None], axis=0)
        constant_v += tl.sum(y_v, axis=0)
        constant_1 += tl.sum(y_1, axis=0)
    _store_slice(state_ptr + head * stride_state_head, a, d, d_v, slice_v, slice_1, constant_v, constant_1, D, DV)


@triton.jit
def _apply_state_kernel(x_ptr, state_ptr, y_ptr, u_ptr, dx_ptr, n_rows, d, d_v, c0, c1, c2,
                        stride_x_head, stride_x_row, stride_state_head, stride_y_head, stride_y_row,
                        stride_u_head, stride_u_row, stride_dx_head, stride_dx_row,
                        BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        STORE_U: tl.constexpr, GRADIENT: tl.constexpr):
    """U_i = sum_f c_f feat_f(x_i) T_f   and   dx_i = sum_f (c_f T_f . Y_i) dfeat_f(x_i)/dx_i.

    Forward: x = q', T = S gives U = O^ (outputs and denominators). Backward: x = q', T = S,
    Y = G^ gives dq'; x = k', T = R, Y = W^ gives dk' and U (then dV = w U[:d_v], dw = U . V^).
    With g_(a,b) = c_a T_(a,b) . Y_i, the derivative of m_a(x) x_b adds g m_a to dx_b and, for
    a < d, sum_b g_(a,b) x_b to dx_a.

    Grid (BH, cdiv(n_rows, BLOCK_N)); the program loops over the d + 1 slices a, each a (D, DV)
    tile of T with its (D,) denominator column; rows x (BLOCK_N, D), Y (BLOCK_N, DV) + (BLOCK_N,).
    """
    head, block = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    x_ptr += head * stride_x_head
    state_ptr += head * stride_state_head
    x = _load_rows(x_ptr + rows[:, None] * stride_x_row, rows, row_mask, d, D)
    if GRADIENT:
        y_ptr += head * stride_y_head
        y_v = _load_rows(y_ptr + rows[:, None] * stride_y_row, rows, row_mask, d_v, DV)
        y_1 = tl.load(y_ptr + rows * stride_y_row + d_v, mask=row_mask, other=0.0).to(tl.float32)
    u_v = tl.zeros((BLOCK_N, DV), dtype=tl.float32)
    u_1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dx = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    for a in range(0, d + 1):
        coefficient = tl.where(a < d, c2, c1)
        m = tl.load(x_ptr + rows * stride_x_row + a, mask=row_mask & (rows * 0 + a < d), other=1.0).to(tl.float32)
        t_v, t_1 = _load_slice(state_ptr, a, d, d_v, D, DV)
        if STORE_U:
            features = (coefficient * m)[:, None] * x
            u_v += tl.dot(features, t_v, input_precision=DOT_PRECISION)
            u_1 += tl.sum(features * t_1[None, :], axis=1)
        if GRADIENT:
            d_features = coefficient * (tl.dot(y_v, tl.trans(t_v), input_precision=DOT_PRECISION)
                                        + y_1[:, None] * t_1[None, :])  # (BLOCK_N, D)
            dx += _feature_gradient(x, m, d_features, a, d, D)
    if STORE_U:
        t0_v, t0_1 = _load_constant(state_ptr, d, d_v, DV)
        u_v += c0 * t0_v[None, :]
        u_1 += c0 * tl.sum(t0_1, axis=0)
        u_ptr += head * stride_u_head
        tl.store(u_ptr + rows[:, None] * stride_u_row + values[None, :], u_v,
                 mask=row_mask[:, None] & (values[None, :] < d_v))
        tl.store(u_ptr + rows * stride_u_row + d_v, u_1, mask=row_mask)
    if GRADIENT:
        dx_ptr += head * stride_dx_head
        tl.store(dx_ptr + rows[:, None] * stride_dx_row + columns[None, :], dx,
                 mask=row_mask[:, None] & (columns[None, :] < d))


# ---- causal -------------------------------------------------------------------------------------
# Query position i sees key position j iff chunk(i) C <= j <= i inside the block, and every j of
# an earlier chunk through the state; keys at positions >= n_q are never seen (SDPA's top-left
# alignment, as in lrcompile.factored). Causal rows are laid out (BH, G, n, e).


@triton.jit
def _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size):
    """(X, visible) for a (BLOCK_M, BLOCK_N) tile: X = q' k'^T, visible the in-chunk causal mask."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    first = rows // chunk_size * chunk_size
    visible = ((keys[None, :] <= rows[:, None]) & (keys[None, :] >= first[:, None])
               & (keys[None, :] < n_k) & (rows[:, None] < n_q))
    return scores, visible


@triton.jit
def _block_forward_kernel(q_ptr, k_ptr, w_ptr, out_ptr, n_q, n_k, d, d_v, chunk_size, c0, c1, c2,
                          stride_q_head, stride_q_group, stride_q_row, stride_k_head, stride_k_row,
                          stride_w_head, stride_w_row, stride_o_head, stride_o_group, stride_o_row,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """O^_i = sum_{chunk(i) C <= j <= i} P(q'_i . k'_j) W^_j: the in-chunk block, applied directly.

    Grid (BH, G, cdiv(n_q, BLOCK_M)). Per step: q (BLOCK_M, D), k (BLOCK_N, D), X and P(X)
    (BLOCK_M, BLOCK_N), W^ (BLOCK_N, DV) + (BLOCK_N,); the rows' keys start at their chunk's
    first position, so at most C + BLOCK_M keys are visited. Stores O^ (plain store: this kernel
    runs first and the sweep adds the earlier chunks' share).
    """
    head, group, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
        scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size)
        block_weights = tl.where(visible, c0 + scores * (c1 + scores * c2), 0.0)
        out_v += tl.dot(block_weights, w_v, input_precision=DOT_PRECISION)
        out_1 += tl.sum(block_weights * w_1[None, :], axis=1)
    out_ptr += head * stride_o_head + group * stride_o_group
    tl.store(out_ptr + rows[:, None] * stride_o_row + values[None, :], out_v,
             mask=row_mask[:, None] & (values[None, :] < d_v))
    tl.store(out_ptr + rows * stride_o_row + d_v, out_1, mask=row_mask)


@triton.jit
def _sweep_forward_kernel(q_ptr, k_ptr, w_ptr, out_ptr, state_ptr, n_q, n_k, groups, d, d_v, chunk_size,
                          c0, c1, c2, stride_q_head, stride_q_group, stride_q_row, stride_k_head, stride_k_row,
                          stride_w_head, stride_w_row, stride_o_head, stride_o_group, stride_o_row, stride_state_head,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """O^_i += sum_{f in slice a} c_f feat_f(q'_i) S_<c,f  for i in chunk c,
    S_<c+1 = S_<c + sum_{j in c} feat(k'_j)^T W^_j.

    Grid (BH, d + 1): program (h, a) walks the chunks in order holding slice a of the running
    state, (D, DV) + (D,) (a = d also the constant feature); query tiles q (BLOCK_M, D) of every
    group, key tiles k (BLOCK_N, D) with W^ (BLOCK_N, DV) + (BLOCK_N,). The d + 1 programs of a
    head each add their share to O^ atomically. Stores the final state, all keys j < min(n_q, n_k).
    """
    head, a = tl.program_id(0), tl.program_id(1)
    values = tl.arange(0, DV)
    q_ptr += head * stride_q_head
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    out_ptr += head * stride_o_head
    coefficient = tl.where(a < d, c2, c1)
    constant = tl.where(a == d, c0, 0.0)  # the a = d program also carries the constant feature
    slice_v = tl.zeros((D, DV), dtype=tl.float32)
    slice_1 = tl.zeros((D,), dtype=tl.float32)
    constant_v = tl.zeros((DV,), dtype=tl.float32)
    constant_1 = tl.zeros((1,), dtype=tl.float32)
    for chunk_start in range(0, n_q, chunk_size):
        chunk_end = tl.minimum(chunk_start + chunk_size, n_q)
        for group in range(0, groups):
            for start in range(chunk_start, chunk_end, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_mask = rows < chunk_end
                row_ptr = q_ptr + group * stride_q_group + rows * stride_q_row
                q = _load_rows(row_ptr[:, None], rows, row_mask, d, D)
                m = tl.load(row_ptr + a, mask=row_mask & (rows * 0 + a < d), other=1.0).to(tl.float32)
                features = (coefficient * m)[:, None] * q
                share_v = tl.dot(features, slice_v, input_precision=DOT_PRECISION) + constant * constant_v[None, :]
                share_1 = tl.sum(features * slice_1[None, :], axis=1) + constant * tl.sum(constant_1, axis=0)
                out_rows = out_ptr + group * stride_o_group + rows * stride_o_row
                tl.atomic_add(out_rows[:, None] + values[None, :], share_v,
                              mask=row_mask[:, None] & (values[None, :] < d_v))
                tl.atomic_add(out_rows + d_v, share_1, mask=row_mask)
        key_end = tl.minimum(chunk_end, n_k)
        for start in range(chunk_start, key_end, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_mask = keys < key_end
            k = _load_rows(k_ptr + keys[:, None] * stride_k_row, keys, key_mask, d, D)
            m = tl.load(k_ptr + keys * stride_k_row + a, mask=key_mask & (keys * 0 + a < d), other=1.0).to(tl.float32)
            w_v = _load_rows(w_ptr + keys[:, None] * stride_w_row, keys, key_mask, d_v, DV)
            w_1 = tl.load(w_ptr + keys * stride_w_row + d_v, mask=key_mask, other=0.0).to(tl.float32)
            features = m[:, None] * k
            slice_v += tl.dot(tl.trans(features), w_v, input_precision=DOT_PRECISION)
            slice_1 += tl.sum(features * w_1[:, None], axis=0)
            constant_v += tl.sum(w_v, axis=0)
            constant_1 += tl.sum(w_1, axis=0)
    _store_slice(state_ptr + head * stride_state_head, a, d, d_v, slice_v, slice_1, constant_v, constant_1, D, DV)


@triton.jit
def _block_query_backward_kernel(q_ptr, k_ptr, w_ptr, g_ptr, dq_ptr, n_q, n_k, d, d_v, chunk_size, c1, c2,
                                 stride_q_head, stride_q_group, stride_q_row, stride_k_head, stride_k_row,
                                 stride_w_head, stride_w_row, stride_g_head, stride_g_group, stride_g_row,
                                 stride_dq_head, stride_dq_group, stride_dq_row,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """dq'_i = sum_{chunk(i) C <= j <= i} (G^_i . W^_j) P'(X_ij) k'_j: the in-chunk block's share of dq'.

    Grid (BH, G, cdiv(n_q, BLOCK_M)). Per step: q (BLOCK_M, D), G^ (BLOCK_M, DV) + (BLOCK_M,),
    k (BLOCK_N, D), W^ (BLOCK_N, DV) + (BLOCK_N,), dX (BLOCK_M, BLOCK_N). Plain store: runs before the sweep.
    """
    head, group, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
        scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size)
        d_weights = tl.dot(g_v, tl.trans(w_v), input_precision=DOT_PRECISION) + g_1[:, None] * w_1[None, :]
        d_scores = tl.where(visible, d_weights * (c1 + 2.0 * c2 * scores), 0.0)
        dq += tl.dot(d_scores, k, input_precision=DOT_PRECISION)
    dq_ptr += head * stride_dq_head + group * stride_dq_group
    tl.store(dq_ptr + rows[:, None] * stride_dq_row + columns[None, :], dq,
             mask=row_mask[:, None] & (columns[None, :] < d))


@triton.jit
def _block_key_backward_kernel(q_ptr, k_ptr, w_ptr, g_ptr, dk_ptr, u_ptr, n_q, n_k, groups, d, d_v, chunk_size,
                               c0, c1, c2, stride_q_head, stride_q_group, stride_q_row, stride_k_head, stride_k_row,
                               stride_w_head, stride_w_row, stride_g_head, stride_g_group, stride_g_row,
                               stride_dk_head, stride_dk_row, stride_u_head, stride_u_row,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """dk'_j = sum_i (G^_i . W^_j) P'(X_ij) q'_i   and   U_j = sum_i P(X_ij) G^_i   over the block's
    queries i (every group, j <= i < end of chunk(j)): the in-chunk block's share of dk' and U.

    Grid (BH, cdiv(n_k, BLOCK_N)). Per step: k (BLOCK_N, D), W^ (BLOCK_N, DV) + (BLOCK_N,) held;
    q (BLOCK_M, D), G^ (BLOCK_M, DV) + (BLOCK_M,), X (BLOCK_M, BLOCK_N). Plain store: keys no
    query sees (j >= n_q) get zeros.
    """
    head, block = tl.program_id(0), tl.program_id(1)
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
            scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size)
            block_weights = tl.where(visible, c0 + scores * (c1 + scores * c2), 0.0)
            d_weights = tl.dot(g_v, tl.trans(w_v), input_precision=DOT_PRECISION) + g_1[:, None] * w_1[None, :]
            d_scores = tl.where(visible, d_weights * (c1 + 2.0 * c2 * scores), 0.0)
            dk += tl.dot(tl.trans(d_scores), q, input_precision=DOT_PRECISION)
            u_v += tl.dot(tl.trans(block_weights), g_v, input_precision=DOT_PRECISION)
            u_1 += tl.sum(block_weights * g_1[:, None], axis=0)
    dk_ptr += head * stride_dk_head
    tl.store(dk_ptr + keys[:, None] * stride_dk_row + columns[None, :], dk,
             mask=key_mask[:, None] & (columns[None, :] < d))
    u_ptr += head * stride_u_head
    tl.store(u_ptr + keys[:, None] * stride_u_row + values[None, :], u_v,
             mask=key_mask[:, None] & (values[None, :] < d_v))
    tl.store(u_ptr + keys * stride_u_row + d_v, u_1, mask=key_mask)


@triton.jit
def _feature_gradient(x, m, d_features, a, d, D: tl.constexpr):
    """dL/dx for features m_a(x) x_b with gradients d_features (rows, D): m_a dF_(a,b) into column b,
    and for a < d, sum_b dF_(a,b) x_b into column a."""
    columns = tl.arange(0, D)
    own = (columns == a) & (columns * 0 + a < d)
    return m[:, None] * d_features + tl.where(own[None, :], tl.sum(d_features * x, axis=1)[:, None], 0.0)


@triton.jit
def _sweep_backward_kernel(q_ptr, k_ptr, w_ptr, g_ptr, state_ptr, dq_ptr, dk_ptr, u_ptr,
                           n_q, n_k, groups, d, d_v, chunk_size, c0, c1, c2,
                           stride_q_head, stride_q_group, stride_q_row, stride_k_head, stride_k_row,
                           stride_w_head, stride_w_row, stride_g_head, stride_g_group, stride_g_row,
                           stride_state_head, stride_dq_head, stride_dq_group, stride_dq_row,
                           stride_dk_head, stride_dk_row, stride_u_head, stride_u_row,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
    """The reverse sweep over chunks c, for slice a of the states (a = d also the constant feature):

        S_<c = S_<c+1 - sum_{j in c} feat(k'_j)^T W^_j           (peeled from the forward's total)
        U_j  += sum_{f in a} c_f feat_f(k'_j) R_>c,f,   dk'_j += d/dk'_j of dfeat_(a,.) = c_a R_>c,(a,.) W^_j
        dq'_i += d/dq'_i of dfeat_(a,.) = c_a S_<c,(a,.) G^_i
        R_>=c = R_>c + sum_{i in c} feat(q'_i)^T G^_i

    Grid (BH, d + 1); held: slices of S and R, (D, DV) + (D,) each; tiles as in the forward sweep.
    Adds its share to dq', dk', U atomically (the block kernels stored theirs first).
    """
    head, a = tl.program_id(0), tl.program_id(1)
    values = tl.arange(0, DV)
    q_ptr += head * stride_q_head
    g_ptr += head * stride_g_head
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    dq_ptr += head * stride_dq_head
    dk_ptr += head * stride_dk_head
    u_ptr += head * stride_u_head
    columns = tl.arange(0, D)
    coefficient = tl.where(a < d, c2, c1)
    constant = tl.where(a == d, c0, 0.0)
    slice_v, slice_1 = _load_slice(state_ptr + head * stride_state_head, a, d, d_v, D, DV)
    r_v = tl.zeros((D, DV), dtype=tl.float32)
    r_1 = tl.zeros((D,), dtype=tl.float32)
    r0_v = tl.zeros((DV,), dtype=tl.float32)
    r0_1 = tl.zeros((1,), dtype=tl.float32)
    n_chunks = tl.cdiv(n_q, chunk_size)
    for reverse in range(0, n_chunks):
        chunk_start = (n_chunks - 1 - reverse) * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, n_q)
        key_end = tl.minimum(chunk_end, n_k)
        for start in range(chunk_start, key_end, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_mask = keys < key_end
            k = _load_rows(k_ptr + keys[:, None] * stride_k_row, keys, key_mask, d, D)
            m = tl.load(k_ptr + keys * stride_k_row + a, mask=key_mask & (keys * 0 + a < d), other=1.0).to(tl.float32)
            w_v = _load_rows(w_ptr + keys[:, None] * stride_w_row, keys, key_mask, d_v, DV)
            w_1 = tl.load(w_ptr + keys * stride_w_row + d_v, mask=key_mask, other=0.0).to(tl.float32)
            features = m[:, None] * k
            slice_v -= tl.dot(tl.trans(features), w_v, input_precision=DOT_PRECISION)
            slice_1 -= tl.sum(features * w_1[:, None], axis=0)
            share_v = coefficient * tl.dot(features, r_v, input_precision=DOT_PRECISION) + constant * r0_v[None, :]
            share_1 = coefficient * tl.sum(features * r_1[None, :], axis=1) + constant * tl.sum(r0_1, axis=0)
            u_rows = u_ptr + keys * stride_u_row
            tl.atomic_add(u_rows[:, None] + values[None, :], share_v, mask=key_mask[:, None] & (values[None, :] < d_v))
            tl.atomic_add(u_rows + d_v, share_1, mask=key_mask)
            d_features = coefficient * (tl.dot(w_v, tl.trans(r_v), input_precision=DOT_PRECISION)
                                        + w_1[:, None] * r_1[None, :])
            tl.atomic_add(dk_ptr + keys[:, None] * stride_dk_row + columns[None, :],
                          _feature_gradient(k, m, d_features, a, d, D),
                          mask=key_mask[:, None] & (columns[None, :] < d))
        for group in range(0, groups):
            for start in range(chunk_start, chunk_end, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_mask = rows < chunk_end
                q_rows = q_ptr + group * stride_q_group + rows * stride_q_row
                q = _load_rows(q_rows[:, None], rows, row_mask, d, D)
                m = tl.load(q_rows + a, mask=row_mask & (rows * 0 + a < d), other=1.0).to(tl.float32)
                g_rows = g_ptr + group * stride_g_group + rows * stride_g_row
                g_v = _load_rows(g_rows[:, None], rows, row_mask, d_v, DV)
                g_1 = tl.load(g_rows + d_v, mask=row_mask, other=0.0).to(tl.float32)
                d_features = coefficient * (tl.dot(g_v, tl.trans(slice_v), input_precision=DOT_PRECISION)
                                            + g_1[:, None] * slice_1[None, :])
                tl.atomic_add(dq_ptr + group * stride_dq_group + rows[:, None] * stride_dq_row + columns[None, :],
                              _feature_gradient(q, m, d_features, a, d, D),
                              mask=row_mask[:, None] & (columns[None, :] < d))
                features = m[:, None] * q
                r_v += tl.dot(tl.trans(features), g_v, input_precision=DOT_PRECISION)
                r_1 += tl.sum(features * g_1[:, None], axis=0)
                r0_v += tl.sum(g_v, axis=0)
                r0_1 += tl.sum(g_1, axis=0)


# ---- launchers ----------------------------------------------------------------------------------
# `forward` and `backward` are what the ops below call, and what the tests call directly (under
# TRITON_INTERPRET=1 on CPU tensors). Every tensor a kernel sees is contiguous with heads
# flattened: rows (BH, n, e); the G query heads of a key head are G n_q consecutive rows when
# non-causal (any split into blocks will do) and a (BH, G, n_q, e) block when causal.


def _tile(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _block_size(device: torch.device, head_dim: int, value_dim: int) -> int:
    """Rows per tile. Under the interpreter (CPU tensors) 16: it runs every program in Python.

    On CUDA, 64, or 32 past d or d_v = 64: the sweeps hold (D, DV) float32 state slices in
    registers, and compiled for sm_90 they spill at 64-row tiles once D or DV is 128.
    """
    if device.type != "cuda":
        return 16
    return 64 if max(head_dim, value_dim) <= 64 else 32


def _polynomial(coefficients) -> tuple[float, float, float]:
    padded = [float(c) for c in coefficients] + [0.0] * (MAX_DEGREE + 1 - len(coefficients))
    return padded[0], padded[1], padded[2]


def state_rows(head_dim: int) -> int:
    """Rows of the full-layout degree-2 state: d (d + 1) + 1 (see the module docstring)."""
    return head_dim * (head_dim + 1) + 1


def _features_state(x, y, d, d_v, block):
    """T = sum_j feat(x_j)^T Y_j for rows x (BH, n, d), Y (BH, n, d_v + 1): (BH, r_full, d_v + 1)."""
    state = x.new_empty(x.shape[0], state_rows(d), d_v + 1, dtype=torch.float32)
    wrap_triton(_state_kernel)[(x.shape[0], d + 1)](
        x, y, state, x.shape[1], d, d_v,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), state.stride(0),
        BLOCK_N=block, D=_tile(d), DV=_tile(d_v))
    return state


def _apply_state(x, state, y, d, d_v, polynomial, block, store_u=True, gradient=False):
    """(U (BH, n, d_v + 1) or None, dx (BH, n, d) or None) for rows x against state T."""
    heads, n = x.shape[:2]
    u = x.new_empty(heads, n, d_v + 1, dtype=torch.float32) if store_u else x.new_empty(0, 1, 1)
    dx = x.new_empty(heads, n, d, dtype=torch.float32) if gradient else x.new_empty(0, 1, 1)
    y = y if gradient else x  # unread without GRADIENT: any tensor will do as the pointer
    wrap_triton(_apply_state_kernel)[(heads, triton.cdiv(n, block))](
        x, state, y, u, dx, n, d, d_v, *polynomial,
        x.stride(0), x.stride(1), state.stride(0), y.stride(0), y.stride(1),
        u.stride(0), u.stride(1), dx.stride(0), dx.stride(1),
        BLOCK_N=block, D=_tile(d), DV=_tile(d_v), STORE_U=store_u, GRADIENT=gradient)
    return (u if store_u else None), (dx if gradient else None)


def _prepare(q, k, v, key_weight, scale, causal):
    """q' (B, H, G, n_q, d), k' (B, H, n_k, d), W^ = w [V | 1] (B, H, n_k, d_v + 1), in float32."""
    q, k, v = (t.float() for t in (q, k, v))
    key_weight = None if key_weight is None else key_weight.float()
    centred, valid, valid_count = centre_keys(k, key_weight, scale, causal)
    weighted = _weighted(_append_ones(v), key_weight)
    return (q * scale**0.5).contiguous(), centred.contiguous(), weighted.contiguous(), key_weight, valid, valid_count


def forward(q, k, v, key_weight, coefficients, scale, causal, chunk_size, block_size=None):
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state): factored_attention's values.

    The state is (B, H, d (d + 1) + 1, d_v + 1) in the full layout, or factored.py's where the
    call falls back to the torch sweep (degree > 2, float64, d > 128).
    """
    if not supports(q, v, coefficients):
        out, denominator, state, _ = torch.ops.lrcompile.factored_attention(
            q, k, v, key_weight, list(coefficients), scale, causal, chunk_size, 0.0, "allow", "triton-fallback")
        return out, denominator, state
    batch, heads, groups, n_q, d = q.shape
    d_v = v.shape[-1]
    block = block_size or _block_size(q.device, d, d_v)
    polynomial = _polynomial(coefficients)
    q_rows, k_rows, weighted, _, _, _ = _prepare(q, k, v, key_weight, scale, causal)
    q_rows, k_rows, weighted = q_rows.flatten(0, 1), k_rows.flatten(0, 1), weighted.flatten(0, 1)
    if causal:
        out_hat, state = _causal_forward(q_rows, k_rows, weighted, d, d_v, polynomial, chunk_size, block)
    else:
        state = _features_state(k_rows, weighted, d, d_v, block)
        out_hat = _apply_state(q_rows.flatten(1, 2), state, None, d, d_v, polynomial, block)[0]
    out_hat = out_hat.reshape(batch, heads, groups, n_q, d_v + 1)
    denominator = out_hat[..., d_v]
    out = out_hat[..., :d_v] / denominator.unsqueeze(-1)
    return out.to(q.dtype), denominator.contiguous(), state.unflatten(0, (batch, heads))


def _causal_forward(q_rows, k_rows, weighted, d, d_v, polynomial, chunk_size, block):
    """O^ (BH, G, n_q, d_v + 1) and the state of all keys j < min(n_q, n_k), for q' (BH, G, n_q, d)."""
    heads, groups, n_q = q_rows.shape[:3]
    n_k = k_rows.shape[1]
    out_hat = q_rows.new_empty(heads, groups, n_q, d_v + 1, dtype=torch.float32)
    state = q_rows.new_empty(heads, state_rows(d), d_v + 1, dtype=torch.float32)
    common = dict(BLOCK_M=block, BLOCK_N=block, D=_tile(d), DV=_tile(d_v))
    strides = (*q_rows.stride()[:3], *k_rows.stride()[:2], *weighted.stride()[:2], *out_hat.stride()[:3])
    wrap_triton(_block_forward_kernel)[(heads, groups, triton.cdiv(n_q, block))](
        q_rows, k_rows, weighted, out_hat, n_q, n_k, d, d_v, chunk_size, *polynomial, *strides, **common)
    wrap_triton(_sweep_forward_kernel)[(heads, d + 1)](
        q_rows, k_rows, weighted, out_hat, state, n_q, n_k, groups, d, d_v, chunk_size, *polynomial,
        *strides, state.stride(0), **common)
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
    block = block_size or _block_size(q.device, d, d_v)
    polynomial = _polynomial(coefficients)
    q_rows, k_rows, weighted, key_weight32, valid, valid_count = _prepare(q, k, v, key_weight, scale, causal)
    grad_out, out = grad_out.float(), out.float()
    # G^_i = [dO_i | -(dO_i . out_i)] / D_i  (B, H, G, n_q, d_v + 1)
    g_hat = torch.cat([grad_out, -(grad_out * out).sum(-1, keepdim=True)], dim=-1) / denominator.unsqueeze(-1)
    q_rows, g_rows = q_rows.flatten(0, 1), g_hat.contiguous().flatten(0, 1)
    k_rows, weighted, state = k_rows.flatten(0, 1), weighted.flatten(0, 1), state.flatten(0, 1).contiguous()
    if causal:
        dq, dk, key_grads = _causal_backward(q_rows, k_rows, weighted, g_rows, state, d, d_v, polynomial,
                                             chunk_size, block)
    else:
        query_state = _features_state(q_rows.flatten(1, 2), g_rows.flatten(1, 2), d, d_v, block)  # R
        dq = _apply_state(q_rows.flatten(1, 2), state, g_rows.flatten(1, 2), d, d_v, polynomial, block,
                          store_u=False, gradient=True)[1]
        key_grads, dk = _apply_state(k_rows, query_state, weighted, d, d_v, polynomial, block, gradient=True)
    dq = dq.reshape(batch, heads, groups, n_q, d)
    dk, key_grads = dk.unflatten(0, (batch, heads)), key_grads.unflatten(0, (batch, heads))
    if not causal:
        dk = dk - _valid_mean_correction(dk, valid, valid_count)
    # U_j: dV_j = w_j U_j[:d_v], dw_j = U_j . V^_j
    dv = _weighted(key_grads[..., :d_v], key_weight32)
    dw = (key_grads * _append_ones(v.float())).sum(-1).to(key_weight.dtype) if key_weight_grad else q.new_empty(0)
    root_scale = scale**0.5
    return (dq * root_scale).to(q.dtype), (dk * root_scale).to(k.dtype), dv.to(v.dtype), dw


def _causal_backward(q_rows, k_rows, weighted, g_rows, state, d, d_v, polynomial, chunk_size, block):
    """dq' (BH, G, n_q, d), dk' (BH, n_k, d), U (BH, n_k, d_v + 1): block kernels store, the sweep adds."""
    heads, groups, n_q = q_rows.shape[:3]
    n_k = k_rows.shape[1]
    dq = torch.empty_like(q_rows, dtype=torch.float32)
    dk = torch.empty_like(k_rows, dtype=torch.float32)
    key_grads = k_rows.new_empty(heads, n_k, d_v + 1, dtype=torch.float32)
    common = dict(BLOCK_M=block, BLOCK_N=block, D=_tile(d), DV=_tile(d_v))
    inputs = (*q_rows.stride()[:3], *k_rows.stride()[:2], *weighted.stride()[:2], *g_rows.stride()[:3])
    wrap_triton(_block_query_backward_kernel)[(heads, groups, triton.cdiv(n_q, block))](
        q_rows, k_rows, weighted, g_rows, dq, n_q, n_k, d, d_v, chunk_size, *polynomial[1:],
        *inputs, *dq.stride()[:3], **common)
    wrap_triton(_block_key_backward_kernel)[(heads, triton.cdiv(n_k, block))](
        q_rows, k_rows, weighted, g_rows, dk, key_grads, n_q, n_k, groups, d, d_v, chunk_size, *polynomial,
        *inputs, *dk.stride()[:2], *key_grads.stride()[:2], **common)
    wrap_triton(_sweep_backward_kernel)[(heads, d + 1)](
        q_rows, k_rows, weighted, g_rows, state, dq, dk, key_grads, n_q, n_k, groups, d, d_v, chunk_size,
        *polynomial, *inputs, state.stride(0), *dq.stride()[:3], *dk.stride()[:2], *key_grads.stride()[:2],
        **common)
    return dq, dk, key_grads


# ---- the ops ------------------------------------------------------------------------------------
# Registered with torch.library.triton_op so that under torch.compile Inductor sees the kernels
# themselves (wrap_triton) beside the Triton it generates for the rest of the model. They are
# for CUDA sites only: under torch.compile a triton_op is decomposed into its kernels whatever
# the device, and Inductor cannot run user Triton kernels on the CPU, so the rewrite must pick
# `lrcompile::factored_attention` for CPU sites (DESIGN §8). No CPU kernel is registered here.
# Eagerly, and under TRITON_INTERPRET=1 on CPU tensors, the op runs `forward`/`backward` above.


@triton_op("lrcompile::triton_factored_attention", mutates_args=())
def triton_factored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state (B, H, d (d + 1) + 1, d_v + 1))."""
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
