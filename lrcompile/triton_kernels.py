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
accumulates in float32; float16/bfloat16 inputs are read as they are and results cast back.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/test_triton_kernels.py
calls `forward` and `backward` below directly). Fallback to the torch sweep (lrcompile.factored):
degree > 2, and float64 inputs (the kernels accumulate in float32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from lrcompile.factored import _append_ones, _valid_mean_correction, _weighted, centre_keys

MAX_DEGREE = 2
MAX_HEAD_DIM = 128


def supports(q: torch.Tensor, coefficients) -> bool:
    """True where the Triton kernels run this call; elsewhere `forward`/`backward` fall back to the torch sweep."""
    return (len(coefficients) - 1 <= MAX_DEGREE and q.shape[-1] <= MAX_HEAD_DIM
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
    return tl.load(ptr + columns[None, :], mask=row_mask[:, None] & (columns[None, :] < width), other=0.0).to(tl.float32)


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
    columns, values = tl.arange(0, D), tl.arange(0, DV)
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
        slice_v += tl.dot(tl.trans(features), y_v, input_precision="ieee")
        slice_1 += tl.sum(features * y_1[:, None], axis=0)
        constant_v += tl.sum(y_v, axis=0)
        constant_1 += tl.sum(y_1, axis=0)
    state_ptr += head * stride_state_head
    stride_state_row = d_v + 1
    feature_rows = a * d + columns
    store_mask = columns < d
    tl.store(state_ptr + feature_rows[:, None] * stride_state_row + values[None, :], slice_v,
             mask=store_mask[:, None] & (values[None, :] < d_v))
    tl.store(state_ptr + feature_rows * stride_state_row + d_v, slice_1, mask=store_mask)
    constant_row = state_ptr + (d * (d + 1)) * stride_state_row
    tl.store(constant_row + values, constant_v, mask=(values < d_v) & (values * 0 + a == d))
    tl.store(constant_row + d_v + tl.arange(0, 1), constant_1, mask=tl.arange(0, 1) + a == d)


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
    stride_state_row = d_v + 1
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
        feature_rows = a * d + columns
        slice_mask = columns < d
        t_v = tl.load(state_ptr + feature_rows[:, None] * stride_state_row + values[None, :],
                      mask=slice_mask[:, None] & (values[None, :] < d_v), other=0.0)
        t_1 = tl.load(state_ptr + feature_rows * stride_state_row + d_v, mask=slice_mask, other=0.0)
        if STORE_U:
            features = (coefficient * m)[:, None] * x
            u_v += tl.dot(features, t_v, input_precision="ieee")
            u_1 += tl.sum(features * t_1[None, :], axis=1)
        if GRADIENT:
            d_features = coefficient * (tl.dot(y_v, tl.trans(t_v), input_precision="ieee")
                                        + y_1[:, None] * t_1[None, :])  # (BLOCK_N, D)
            dx += m[:, None] * d_features
            own = (columns == a) & (columns * 0 + a < d)
            dx += tl.where(own[None, :], tl.sum(d_features * x, axis=1)[:, None], 0.0)
    if STORE_U:
        constant_row = state_ptr + (d * (d + 1)) * stride_state_row
        u_v += c0 * tl.load(constant_row + values, mask=values < d_v, other=0.0)[None, :]
        u_1 += c0 * tl.sum(tl.load(constant_row + d_v + tl.arange(0, 1)), axis=0)
        u_ptr += head * stride_u_head
        tl.store(u_ptr + rows[:, None] * stride_u_row + values[None, :], u_v,
                 mask=row_mask[:, None] & (values[None, :] < d_v))
        tl.store(u_ptr + rows * stride_u_row + d_v, u_1, mask=row_mask)
    if GRADIENT:
        dx_ptr += head * stride_dx_head
        tl.store(dx_ptr + rows[:, None] * stride_dx_row + columns[None, :], dx,
                 mask=row_mask[:, None] & (columns[None, :] < d))


# ---- launchers ----------------------------------------------------------------------------------
# `forward` and `backward` are what the ops below call, and what the tests call directly (under
# TRITON_INTERPRET=1 on CPU tensors). Every tensor a kernel sees is contiguous with heads
# flattened: rows (BH, n, e); the G query heads of a key head are G n_q consecutive rows when
# non-causal (any split into blocks will do) and a (BH, G, n_q, e) block when causal.


def _tile(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _block_size(device: torch.device) -> int:
    # the interpreter runs every program in Python: small tiles keep its tests quick
    return 64 if device.type == "cuda" else 16


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
    y = y if gradient else x
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
    if not supports(q, coefficients):
        out, denominator, state, _ = torch.ops.lrcompile.factored_attention(
            q, k, v, key_weight, list(coefficients), scale, causal, chunk_size, 0.0, "allow", "triton-fallback")
        return out, denominator, state
    batch, heads, groups, n_q, d = q.shape
    d_v = v.shape[-1]
    block = block_size or _block_size(q.device)
    polynomial = _polynomial(coefficients)
    q_rows, k_rows, weighted, _, _, _ = _prepare(q, k, v, key_weight, scale, causal)
    q_rows, k_rows, weighted = q_rows.flatten(0, 1), k_rows.flatten(0, 1), weighted.flatten(0, 1)
    if causal:
        raise NotImplementedError("causal")  # next commit
    else:
        state = _features_state(k_rows, weighted, d, d_v, block)
        out_hat = _apply_state(q_rows.flatten(1, 2), state, None, d, d_v, polynomial, block)[0]
    out_hat = out_hat.reshape(batch, heads, groups, n_q, d_v + 1)
    denominator = out_hat[..., d_v]
    out = out_hat[..., :d_v] / denominator.unsqueeze(-1)
    return out.to(q.dtype), denominator.contiguous(), state.unflatten(0, (batch, heads))
