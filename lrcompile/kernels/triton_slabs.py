"""The state kernels of lrcompile.kernels.triton: symmetric features formed in registers, by slabs.

The state's rows are the monomials of degree <= g of x (q' or k'), each once: r = C(d + g, g)
rows, in lrcompile.math.features.monomial_table's order, so that this state and the torch sweep's
are one layout. The constant first, then by degree; within a degree colex over sorted indices:

    row 0                                                   1
    row 1 + l                                               x_l
    row 1 + d + C(j + 1, 2) + i                             x_i x_j          i <= j < d
    row 1 + d + C(d + 1, 2) + C(l + 2, 3) + C(j + 1, 2) + i    x_i x_j x_l      i <= j <= l < d

Coefficients are never stored in a state: phi carries them, psi none (lrcompile.math.features), so
c_m times the monomial's multinomial count (2 for x_i x_j, i < j; 3 or 6 at degree 3) is applied
where a state meets query features.

Slabs. The monomials of degree m >= 2 are formed from column blocks of S_m consecutive indices:
slab (I, J) of degree 2 is the (rows, S^2) outer product of x's column tiles I and J (I <= J),
slab (I, J, L) of degree 3 the (rows, S^3) product of three (I <= J <= L), each formed in
registers from the rows already loaded and consumed at once by a tile product: nothing n x r or
n x n reaches global memory. A diagonal slab (I = J) also forms x_i x_j with i > j, x_j x_i again:
those features are masked where a state is stored and loaded, so each monomial counts once. The
slabs therefore compute a little more than r rows (d = 64, S = 8: 36 slabs of 64 for the 2080
quadratic monomials) and store exactly r. The degree-1 slab is the row tile itself (S = D) and
carries the constant row. Slabs of a degree are numbered colex over their blocks (slab_blocks).

Kernels:
    state_kernel          T = sum_j feat(x_j)^T Y_j, one slab per program, n split across programs
    chunk_states_kernel   causal: the state entering each chunk (S_<c, or R_>c in reverse), one
                          slab per program; the only serial walk of the causal path
    apply_state_kernel    U_i = sum_f c_f feat_f(x_i) T_f and dx_i, every slab inside one program
Each state kernel runs once per degree m <= g (its constexpr POWER); the launches write disjoint
rows of one state.
"""

import triton
import triton.language as tl

from lrcompile.kernels.triton_tiles import dot, head_id, load_rows


@triton.jit
def slab_blocks(slab, n_blocks, POWER: tl.constexpr, NBP: tl.constexpr):
    """(I, J, L), the column blocks of slab `slab` of degree POWER, numbered colex over I <= J (<= L):
    slab = C(J + 1, 2) + I at degree 2 (L = J), C(L + 2, 3) + C(J + 1, 2) + I at degree 3; the
    degree-1 slab is (0, 0, 0). NBP >= n_blocks is a power of two."""
    blocks = tl.arange(0, NBP)
    in_range = blocks < n_blocks
    if POWER == 3:
        L = tl.sum(((blocks * (blocks + 1) * (blocks + 2) // 6 <= slab) & in_range).to(tl.int32), axis=0) - 1
        rest = slab - L * (L + 1) * (L + 2) // 6
        J = tl.sum(((blocks * (blocks + 1) // 2 <= rest) & (blocks <= L)).to(tl.int32), axis=0) - 1
        I = rest - J * (J + 1) // 2
    elif POWER == 2:
        J = tl.sum(((blocks * (blocks + 1) // 2 <= slab) & in_range).to(tl.int32), axis=0) - 1
        I = slab - J * (J + 1) // 2
        L = J
    else:
        I = slab * 0
        J = I
        L = I
    return I, J, L


@triton.jit
def slab_monomials(I, J, L, d, POWER: tl.constexpr, S: tl.constexpr):
    """(rows, owned, multiplicity), each (S^POWER,): the state row of each feature of slab (I, J, L),
    whether the slab owns that monomial (i <= j <= l < d), and the monomial's multinomial count."""
    s = tl.arange(0, S)
    if POWER == 1:
        rows = 1 + s
        owned = s < d
        multiplicity = tl.where(owned, 1.0, 0.0)
    elif POWER == 2:
        zero = s[:, None] * 0 + s[None, :] * 0
        i = tl.reshape(I * S + s[:, None] + zero, (S * S,))
        j = tl.reshape(J * S + s[None, :] + zero, (S * S,))
        rows = 1 + d + j * (j + 1) // 2 + i
        owned = (i <= j) & (j < d)
        multiplicity = tl.where(i < j, 2.0, 1.0)
    else:
        zero = s[:, None, None] * 0 + s[None, :, None] * 0 + s[None, None, :] * 0
        i = tl.reshape(I * S + s[:, None, None] + zero, (S * S * S,))
        j = tl.reshape(J * S + s[None, :, None] + zero, (S * S * S,))
        l = tl.reshape(L * S + s[None, None, :] + zero, (S * S * S,))  # noqa: E741 - the index's name in the layout
        rows = 1 + d + d * (d + 1) // 2 + l * (l + 1) * (l + 2) // 6 + j * (j + 1) // 2 + i
        owned = (i <= j) & (j <= l) & (l < d)
        multiplicity = tl.where((i == j) & (j == l), 1.0, tl.where((i == j) | (j == l), 3.0, 6.0))
    return rows, owned, multiplicity


@triton.jit
def _columns(row_ptrs, row_mask, first, d, S: tl.constexpr):
    """Columns first .. first + S - 1 of the rows at row_ptrs, (BLOCK_N, S) float32, zero past d."""
    columns = first + tl.arange(0, S)
    mask = row_mask[:, None] & (columns[None, :] < d)
    return tl.load(row_ptrs[:, None] + columns[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def slab_factors(row_ptrs, row_mask, I, J, L, d, POWER: tl.constexpr, S: tl.constexpr):
    """The column tiles x_I, x_J, x_L (BLOCK_N, S) whose products are the slab's features (degree 1:
    the row tile, S = D, in all three)."""
    x_i = _columns(row_ptrs, row_mask, I * S, d, S)
    if POWER >= 2:
        x_j = _columns(row_ptrs, row_mask, J * S, d, S)
    else:
        x_j = x_i
    if POWER == 3:
        x_l = _columns(row_ptrs, row_mask, L * S, d, S)
    else:
        x_l = x_j
    return x_i, x_j, x_l


@triton.jit
def slab_features(x_i, x_j, x_l, POWER: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr):
    """The slab's (BLOCK_N, S^POWER) features, in slab_monomials' order."""
    if POWER == 1:
        features = x_i
    elif POWER == 2:
        features = tl.reshape(x_i[:, :, None] * x_j[:, None, :], (BLOCK_N, S * S))
    else:
        features = tl.reshape(x_i[:, :, None, None] * x_j[:, None, :, None] * x_l[:, None, None, :],
                              (BLOCK_N, S * S * S))
    return features


@triton.jit
def _in_block(part, block, S: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A (BLOCK_N, S) tile as columns block S .. block S + S - 1 of a (BLOCK_N, D) tile, zero elsewhere:
    a register tile has no column slices to add into."""
    blocks = tl.arange(0, D // S)
    return tl.reshape(tl.where((blocks == block)[None, :, None], part[:, None, :], 0.0), (BLOCK_N, D))


@triton.jit
def slab_feature_gradient(d_features, x_i, x_j, x_l, I, J, L, POWER: tl.constexpr, S: tl.constexpr,
                          D: tl.constexpr, BLOCK_N: tl.constexpr):
    """dL/dx (BLOCK_N, D) through the slab's features, given their gradients d_features (BLOCK_N, S^POWER):
    each factor's column block takes the product of the others."""
    if POWER == 1:
        dx = d_features
    elif POWER == 2:
        d_outer = tl.reshape(d_features, (BLOCK_N, S, S))
        dx = (_in_block(tl.sum(d_outer * x_j[:, None, :], axis=2), I, S, D, BLOCK_N)
              + _in_block(tl.sum(d_outer * x_i[:, :, None], axis=1), J, S, D, BLOCK_N))
    else:
        d_outer = tl.reshape(d_features, (BLOCK_N, S, S, S))
        d_i = tl.sum(tl.sum(d_outer * (x_j[:, :, None] * x_l[:, None, :])[:, None, :, :], axis=3), axis=2)
        d_j = tl.sum(tl.sum(d_outer * (x_i[:, :, None] * x_l[:, None, :])[:, :, None, :], axis=3), axis=1)
        d_l = tl.sum(tl.sum(d_outer * (x_i[:, :, None] * x_j[:, None, :])[:, :, :, None], axis=2), axis=1)
        dx = (_in_block(d_i, I, S, D, BLOCK_N) + _in_block(d_j, J, S, D, BLOCK_N)
              + _in_block(d_l, L, S, D, BLOCK_N))
    return dx


# A state (heads, r, d_v + 1) is read and written a slab at a time: the slab's rows as a
# (S^POWER, DV) value tile and its denominator column, the rows it does not own masked.


@triton.jit
def load_slab(state_ptr, rows, owned, d_v, DV: tl.constexpr):
    values = tl.arange(0, DV)
    slab_v = tl.load(state_ptr + rows[:, None] * (d_v + 1) + values[None, :],
                     mask=owned[:, None] & (values[None, :] < d_v), other=0.0)
    slab_1 = tl.load(state_ptr + rows * (d_v + 1) + d_v, mask=owned, other=0.0)
    return slab_v, slab_1


@triton.jit
def store_slab(state_ptr, rows, owned, d_v, slab_v, slab_1, constant_v, constant_1, POWER: tl.constexpr,
               DV: tl.constexpr):
    """The slab's owned rows; the degree-1 slab also writes the constant row (row 0)."""
    values = tl.arange(0, DV)
    tl.store(state_ptr + rows[:, None] * (d_v + 1) + values[None, :], slab_v,
             mask=owned[:, None] & (values[None, :] < d_v))
    tl.store(state_ptr + rows * (d_v + 1) + d_v, slab_1, mask=owned)
    if POWER == 1:
        tl.store(state_ptr + values, constant_v, mask=values < d_v)
        tl.store(state_ptr + d_v + tl.arange(0, 1), constant_1)


@triton.jit
def _empty_slab(POWER: tl.constexpr, S: tl.constexpr, DV: tl.constexpr):
    """A slab's float32 accumulators, zero: (F, DV) and (F,) for its features, (DV,) and (1,) for the constant's."""
    return (tl.zeros((S ** POWER, DV), dtype=tl.float32), tl.zeros((S ** POWER,), dtype=tl.float32),
            tl.zeros((DV,), dtype=tl.float32), tl.zeros((1,), dtype=tl.float32))


@triton.jit
def add_rows_to_slab(x_rows, y_rows, row_mask, I, J, L, d, d_v, slab_v, slab_1, constant_v, constant_1,
                     POWER: tl.constexpr, S: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Adds rows (x, [y_v | y_1]) to the slab's share of the state: the features are formed here from
    the rows' column tiles and never stored; the degree-1 slab also sums the constant feature's share."""
    x_i, x_j, x_l = slab_factors(x_rows, row_mask, I, J, L, d, POWER, S)
    features = slab_features(x_i, x_j, x_l, POWER, S, BLOCK_N)
    y_v = load_rows(y_rows[:, None], y_rows, row_mask, d_v, DV)
    y_1 = tl.load(y_rows + d_v, mask=row_mask, other=0.0).to(tl.float32)
    slab_v += dot(tl.trans(features), y_v, DOT_PRECISION)
    slab_1 += tl.sum(features * y_1[:, None], axis=0)
    if POWER == 1:
        constant_v += tl.sum(y_v, axis=0)
        constant_1 += tl.sum(y_1, axis=0)
    return slab_v, slab_1, constant_v, constant_1


@triton.jit
def state_kernel(x_ptr, y_ptr, state_ptr, n_rows, d, d_v, n_blocks, rows_per_split,
                 stride_x_head, stride_x_row, stride_y_head, stride_y_row, stride_state_head, stride_state_split,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, S: tl.constexpr, NBP: tl.constexpr,
                 POWER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """T_f = sum_j feat_f(x_j) Y_j over one split of the rows, for the features f of one slab (no coefficients).

    Grid (BH, slabs of degree POWER, splits): program (h, t, s) sums rows s R .. s R + R - 1
    (R = rows_per_split) into slab t's rows of head h's partial state s; the launcher adds the
    splits' partial states (no atomics). Per step: the slab's column tiles of x (BLOCK_N, S) and
    its features (BLOCK_N, F), F = S^POWER, Y (BLOCK_N, DV) + (BLOCK_N,); the accumulator (F, DV)
    and (F,) in float32 registers. Per call, over every degree's launch: 2 n r' (d_v + 1) FLOPs,
    r' = the rows the slabs compute (r plus the diagonal slabs' doubles); reads x and Y once per
    slab and writes splits r (d_v + 1) floats.
    """
    head, slab, split = head_id(), tl.program_id(1), tl.program_id(2)
    I, J, L = slab_blocks(slab, n_blocks, POWER, NBP)
    x_ptr += head * stride_x_head
    y_ptr += head * stride_y_head
    slab_v, slab_1, constant_v, constant_1 = _empty_slab(POWER, S, DV)
    first_row = split * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, n_rows)
    for start in range(first_row, end_row, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        slab_v, slab_1, constant_v, constant_1 = add_rows_to_slab(
            x_ptr + rows * stride_x_row, y_ptr + rows * stride_y_row, rows < end_row, I, J, L, d, d_v,
            slab_v, slab_1, constant_v, constant_1, POWER, S, DV, BLOCK_N, DOT_PRECISION)
    rows, owned, _ = slab_monomials(I, J, L, d, POWER, S)
    store_slab(state_ptr + head * stride_state_head + split * stride_state_split, rows, owned, d_v, slab_v, slab_1,
               constant_v, constant_1, POWER, DV)


@triton.jit
def chunk_states_kernel(x_ptr, y_ptr, states_ptr, total_ptr, row_limit, groups, d, d_v, chunk_size, n_chunks,
                        n_blocks, stride_x_head, stride_x_group, stride_x_row, stride_y_head, stride_y_group,
                        stride_y_row, stride_states_head, stride_states_chunk, stride_total_head,
                        BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, S: tl.constexpr,
                        NBP: tl.constexpr, POWER: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        REVERSE: tl.constexpr, STORE_TOTAL: tl.constexpr):
    """The state entering each chunk c of C rows, the only serial part of the causal kernels:

        forward   T_c = S_<c = sum_{j < c C} feat(x_j)^T Y_j     (x = k', Y = W^)
        REVERSE   T_c = R_>c = sum_{i >= (c + 1) C} feat(x_i)^T Y_i over every group (x = q', Y = G^)

    and, STORE_TOTAL, the state of every row (the forward's S). Rows stop at row_limit (min(n_q, n_k)
    for keys: no query sees a key past n_q). Grid (BH, slabs of degree POWER): program (h, t)
    walks the chunks holding slab t, (F, DV) + (F,) in float32 registers, stores it for each chunk
    before adding the chunk's rows. Per call, over every degree's launch: 2 n r' (d_v + 1) FLOPs;
    reads x, Y once per slab and writes n_chunks r (d_v + 1) floats.
    """
    head, slab = head_id(), tl.program_id(1)
    I, J, L = slab_blocks(slab, n_blocks, POWER, NBP)
    rows_of_slab, owned, _ = slab_monomials(I, J, L, d, POWER, S)
    x_ptr += head * stride_x_head
    y_ptr += head * stride_y_head
    states_ptr += head * stride_states_head
    slab_v, slab_1, constant_v, constant_1 = _empty_slab(POWER, S, DV)
    for step in range(0, n_chunks):
        if REVERSE:
            chunk = n_chunks - 1 - step
        else:
            chunk = step
        store_slab(states_ptr + chunk * stride_states_chunk, rows_of_slab, owned, d_v, slab_v, slab_1, constant_v,
                   constant_1, POWER, DV)
        chunk_start = chunk * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, row_limit)
        for group in range(0, groups):
            for start in range(chunk_start, chunk_end, BLOCK_N):
                rows = start + tl.arange(0, BLOCK_N)
                slab_v, slab_1, constant_v, constant_1 = add_rows_to_slab(
                    x_ptr + group * stride_x_group + rows * stride_x_row,
                    y_ptr + group * stride_y_group + rows * stride_y_row, rows < chunk_end, I, J, L, d, d_v,
                    slab_v, slab_1, constant_v, constant_1, POWER, S, DV, BLOCK_N, DOT_PRECISION)
    if STORE_TOTAL:
        store_slab(total_ptr + head * stride_total_head, rows_of_slab, owned, d_v, slab_v, slab_1, constant_v,
                   constant_1, POWER, DV)


@triton.jit
def _apply_slab(x_rows, row_mask, y_v, y_1, state_ptr, I, J, L, d, d_v, u_v, u_1, dx, COEFFICIENT: tl.constexpr,
                POWER: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr, STORE_U: tl.constexpr, GRADIENT: tl.constexpr):
    """One slab's share of U = c feat(x) T and of dx = (c T Y) dfeat/dx, for rows x whose mask is row_mask."""
    x_i, x_j, x_l = slab_factors(x_rows, row_mask, I, J, L, d, POWER, S)
    rows, owned, multiplicity = slab_monomials(I, J, L, d, POWER, S)
    t_v, t_1 = load_slab(state_ptr, rows, owned, d_v, DV)
    coefficients = COEFFICIENT * multiplicity
    if STORE_U:
        features = slab_features(x_i, x_j, x_l, POWER, S, BLOCK_N) * coefficients[None, :]
        u_v += dot(features, t_v, DOT_PRECISION)
        u_1 += tl.sum(features * t_1[None, :], axis=1)
    if GRADIENT:
        d_features = coefficients[None, :] * (dot(y_v, tl.trans(t_v), DOT_PRECISION) + y_1[:, None] * t_1[None, :])
        dx += slab_feature_gradient(d_features, x_i, x_j, x_l, I, J, L, POWER, S, D, BLOCK_N)
    return u_v, u_1, dx


@triton.jit
def apply_state_kernel(x_ptr, state_ptr, y_ptr, u_ptr, dx_ptr, n_rows, d, d_v, n_blocks_2, n_blocks_3, groups,
                       chunk_size, n_chunks, stride_x_head, stride_x_row, stride_state_head, stride_state_chunk,
                       stride_y_head, stride_y_row, stride_u_head, stride_u_row, stride_dx_head, stride_dx_row,
                       BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                       DEGREE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       STORE_U: tl.constexpr, GRADIENT: tl.constexpr, CHUNKED: tl.constexpr, ACCUMULATE: tl.constexpr,
                       C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    """U_i = sum_f c_f feat_f(x_i) T_f   and   dx_i = sum_f (c_f T_f . Y_i) dfeat_f(x_i)/dx_i.

    Non-causal: x = q', T = S gives U = O^ (outputs and denominators); x = q', T = S, Y = G^ gives
    dq'; x = k', T = R, Y = W^ gives dk' and U (then dV = w U[:d_v], dw = U . V^). CHUNKED (causal):
    T is the state of row i's chunk, T_c = S_<c (queries) or R_>c (keys), as chunk_states_kernel
    stored it, and ACCUMULATE adds to what the in-chunk block kernels stored for the same rows (this
    program owns them: no atomics).

    Grid (BH G, cdiv(n_rows, BLOCK_N)): the G query heads of a key head share its state (groups =
    G; 1 for keys, and for non-causal queries, whose G heads are rows of one (BH, G n_q, .) block).
    The program loops over the chunks its rows fall in (one, unless a chunk is not a multiple of
    BLOCK_N) and reduces over every slab of every degree inside: per slab, its column tiles of x,
    the (F, DV) + (F,) slab of T, and the rows' Y (BLOCK_N, DV) + (BLOCK_N,). Per call: 2 n r'
    (d_v + 1) FLOPs per product (U, and dx's T Y), reading x, Y once and T once per row block.
    """
    head, block = head_id(), tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    columns, values = tl.arange(0, D), tl.arange(0, DV)
    x_rows = x_ptr + head * stride_x_head + rows * stride_x_row
    state_ptr += (head // groups) * stride_state_head
    u_v = tl.zeros((BLOCK_N, DV), dtype=tl.float32)
    u_1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dx = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    if GRADIENT:
        y_ptr += head * stride_y_head
        y_v = load_rows(y_ptr + rows[:, None] * stride_y_row, rows, row_mask, d_v, DV)
        y_1 = tl.load(y_ptr + rows * stride_y_row + d_v, mask=row_mask, other=0.0).to(tl.float32)
    else:  # unread
        y_v = u_v
        y_1 = u_1
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
        y_v_c = tl.where(in_chunk[:, None], y_v, 0.0)
        y_1_c = tl.where(in_chunk, y_1, 0.0)
        u_v, u_1, dx = _apply_slab(x_rows, in_chunk, y_v_c, y_1_c, chunk_state, 0, 0, 0, d, d_v, u_v, u_1, dx,
                                   C1, 1, D, D, DV, BLOCK_N, DOT_PRECISION, STORE_U, GRADIENT)
        if DEGREE >= 2:
            for J in range(0, n_blocks_2):
                for I in range(0, J + 1):
                    u_v, u_1, dx = _apply_slab(x_rows, in_chunk, y_v_c, y_1_c, chunk_state, I, J, J, d, d_v, u_v,
                                               u_1, dx, C2, 2, S2, D, DV, BLOCK_N, DOT_PRECISION, STORE_U, GRADIENT)
        if DEGREE == 3:
            for L in range(0, n_blocks_3):
                for J in range(0, L + 1):
                    for I in range(0, J + 1):
                        u_v, u_1, dx = _apply_slab(x_rows, in_chunk, y_v_c, y_1_c, chunk_state, I, J, L, d, d_v,
                                                   u_v, u_1, dx, C3, 3, S3, D, DV, BLOCK_N, DOT_PRECISION, STORE_U,
                                                   GRADIENT)
        if STORE_U:
            constant_v = tl.load(chunk_state + values, mask=values < d_v, other=0.0)
            constant_1 = tl.sum(tl.load(chunk_state + d_v + tl.arange(0, 1)), axis=0)
            u_v += tl.where(in_chunk[:, None], C0 * constant_v[None, :], 0.0)
            u_1 += tl.where(in_chunk, C0 * constant_1, 0.0)
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
