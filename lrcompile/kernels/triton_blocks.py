"""The causal in-chunk block kernels of lrcompile.kernels.triton: within its chunk, a query row
attends to the keys at or before it through the polynomial block P(q' k'^T) itself, masked, and
the earlier chunks through their state (lrcompile.kernels.triton_slabs). The block's forward, and
its shares of dq', dk' and U.
"""

import triton
import triton.language as tl

from lrcompile.kernels.triton_tiles import dot, head_id, load_rows

# Query position i sees key position j iff chunk(i) C <= j <= i inside the block, and every j of
# an earlier chunk through the state; keys at positions >= n_q are never seen (SDPA's top-left
# alignment, as in lrcompile.kernels.reference). Causal rows are laid out (BH, G, n, e).


@triton.jit
def _key_tile(k_ptr, w_ptr, start, n_k, d, d_v, stride_k_row, stride_w_row, BLOCK_N: tl.constexpr, D: tl.constexpr,
              DV: tl.constexpr):
    """(keys, k' (BLOCK_N, D), W^ (BLOCK_N, DV) and its last column) of the key tile from `start`, zero
    past n_k."""
    keys = start + tl.arange(0, BLOCK_N)
    key_mask = keys < n_k
    k = load_rows(k_ptr + keys[:, None] * stride_k_row, keys, key_mask, d, D)
    w_v = load_rows(w_ptr + keys[:, None] * stride_w_row, keys, key_mask, d_v, DV)
    w_1 = tl.load(w_ptr + keys * stride_w_row + d_v, mask=key_mask, other=0.0).to(tl.float32)
    return keys, k, w_v, w_1


@triton.jit
def _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION: tl.constexpr):
    """(X, visible) for a (BLOCK_M, BLOCK_N) tile: X = q' k'^T, visible the in-chunk causal mask."""
    scores = dot(q, tl.trans(k), DOT_PRECISION)
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
def block_forward_kernel(q_ptr, k_ptr, w_ptr, out_ptr, n_q, n_k, d, d_v, chunk_size,
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
    head, group, block = head_id(), tl.program_id(1), tl.program_id(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_q
    values = tl.arange(0, DV)
    q_ptr += head * stride_q_head + group * stride_q_group
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    q = load_rows(q_ptr + rows[:, None] * stride_q_row, rows, row_mask, d, D)
    out_v = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    out_1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_key = block * BLOCK_M // chunk_size * chunk_size
    last_key = tl.minimum((block + 1) * BLOCK_M, n_k)
    for start in range(first_key, last_key, BLOCK_N):
        keys, k, w_v, w_1 = _key_tile(k_ptr, w_ptr, start, n_k, d, d_v, stride_k_row, stride_w_row, BLOCK_N, D, DV)
        scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION)
        block_weights = tl.where(visible, _polynomial(scores, C0, C1, C2, C3), 0.0)
        out_v += dot(block_weights, w_v, DOT_PRECISION)
        out_1 += tl.sum(block_weights * w_1[None, :], axis=1)
    out_ptr += head * stride_o_head + group * stride_o_group
    tl.store(out_ptr + rows[:, None] * stride_o_row + values[None, :], out_v,
             mask=row_mask[:, None] & (values[None, :] < d_v))
    tl.store(out_ptr + rows * stride_o_row + d_v, out_1, mask=row_mask)


@triton.jit
def block_query_backward_kernel(q_ptr, k_ptr, w_ptr, g_ptr, dq_ptr, n_q, n_k, d, d_v, chunk_size,
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
    head, group, block = head_id(), tl.program_id(1), tl.program_id(2)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_q
    columns = tl.arange(0, D)
    q_ptr += head * stride_q_head + group * stride_q_group
    g_ptr += head * stride_g_head + group * stride_g_group
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    q = load_rows(q_ptr + rows[:, None] * stride_q_row, rows, row_mask, d, D)
    g_v = load_rows(g_ptr + rows[:, None] * stride_g_row, rows, row_mask, d_v, DV)
    g_1 = tl.load(g_ptr + rows * stride_g_row + d_v, mask=row_mask, other=0.0).to(tl.float32)
    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    first_key = block * BLOCK_M // chunk_size * chunk_size
    last_key = tl.minimum((block + 1) * BLOCK_M, n_k)
    for start in range(first_key, last_key, BLOCK_N):
        keys, k, w_v, w_1 = _key_tile(k_ptr, w_ptr, start, n_k, d, d_v, stride_k_row, stride_w_row, BLOCK_N, D, DV)
        scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION)
        d_weights = dot(g_v, tl.trans(w_v), DOT_PRECISION) + g_1[:, None] * w_1[None, :]
        d_scores = tl.where(visible, d_weights * _polynomial_derivative(scores, C1, C2, C3), 0.0)
        dq += dot(d_scores, k, DOT_PRECISION)
    dq_ptr += head * stride_dq_head + group * stride_dq_group
    tl.store(dq_ptr + rows[:, None] * stride_dq_row + columns[None, :], dq,
             mask=row_mask[:, None] & (columns[None, :] < d))


@triton.jit
def block_key_backward_kernel(q_ptr, k_ptr, w_ptr, g_ptr, dk_ptr, u_ptr, n_q, n_k, groups, d, d_v, chunk_size,
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
    head, block = head_id(), tl.program_id(1)
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    q_ptr += head * stride_q_head
    g_ptr += head * stride_g_head
    k_ptr += head * stride_k_head
    w_ptr += head * stride_w_head
    keys, k, w_v, w_1 = _key_tile(k_ptr, w_ptr, block * BLOCK_N, n_k, d, d_v, stride_k_row, stride_w_row, BLOCK_N, D, DV)
    key_mask = keys < n_k
    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    u_v = tl.zeros((BLOCK_N, DV), dtype=tl.float32)
    u_1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = block * BLOCK_N
    last_row = tl.minimum(((block + 1) * BLOCK_N - 1) // chunk_size * chunk_size + chunk_size, n_q)
    for group in range(0, groups):
        for start in range(first_row, last_row, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < n_q
            q = load_rows(q_ptr + group * stride_q_group + rows[:, None] * stride_q_row, rows, row_mask, d, D)
            g_rows = g_ptr + group * stride_g_group + rows * stride_g_row
            g_v = load_rows(g_rows[:, None], rows, row_mask, d_v, DV)
            g_1 = tl.load(g_rows + d_v, mask=row_mask, other=0.0).to(tl.float32)
            scores, visible = _polynomial_block(q, k, rows, keys, n_q, n_k, chunk_size, DOT_PRECISION)
            block_weights = tl.where(visible, _polynomial(scores, C0, C1, C2, C3), 0.0)
            d_weights = dot(g_v, tl.trans(w_v), DOT_PRECISION) + g_1[:, None] * w_1[None, :]
            d_scores = tl.where(visible, d_weights * _polynomial_derivative(scores, C1, C2, C3), 0.0)
            dk += dot(tl.trans(d_scores), q, DOT_PRECISION)
            u_v += dot(tl.trans(block_weights), g_v, DOT_PRECISION)
            u_1 += tl.sum(block_weights * g_1[:, None], axis=0)
    dk_ptr += head * stride_dk_head
    tl.store(dk_ptr + keys[:, None] * stride_dk_row + columns[None, :], dk,
             mask=key_mask[:, None] & (columns[None, :] < d))
    u_ptr += head * stride_u_head
    tl.store(u_ptr + keys[:, None] * stride_u_row + values[None, :], u_v,
             mask=key_mask[:, None] & (values[None, :] < d_v))
    tl.store(u_ptr + keys * stride_u_row + d_v, u_1, mask=key_mask)
