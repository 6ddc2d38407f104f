"""Triton kernels for the factored attention at degree 1 to 3: what `lrcompile::factored_attention`
and `lrcompile::factored_attention_backward` compute, as `lrcompile::triton_factored_attention`
and `lrcompile::triton_factored_attention_backward`. This module holds the launchers and the ops;
the kernels are in triton_slabs (the states: symmetric features by slabs) and triton_blocks (the
causal in-chunk blocks), their shared primitives in triton_tiles.

Inputs as in lrcompile.kernels.reference: q (B, H, G, n_q, d), k (B, H, n_k, d), v (B, H, n_k, d_v),
key_weight (B, H, n_k) or None, coefficients c_0..c_g, scale, causal, chunk_size. The keys are
centred (k' = sqrt(s) k - mu, non-causal) and q' = sqrt(s) q is formed in torch around the
kernels, as kernels/reference.py does; the kernels run the sweeps. The accuracy guard (lrcompile.ops.guard)
is not part of these ops: it reads data, so the caller composes it.

The state (what the forward returns and the backward consumes) is the torch sweep's:
(B, H, r, d_v + 1) with r = C(d + g, g), one row per monomial of degree <= g of k' in
lrcompile.math.features.monomial_table's order, columns [W^ = w V | w] summed over keys, the last
column the denominator's. Coefficients are never stored in a state: phi carries them, psi none.

Kernels (grid, tile shapes, FLOPs and bytes in each kernel's docstring):

    non-causal  state_kernel           T = sum_j feat(x_j)^T Y_j           S from keys, R from queries
                apply_state_kernel     U_i = sum_f c_f feat_f(x_i) T_f,    dx_i from dfeat = c T Y_i
    causal      block_forward_kernel   in-chunk C x C block P(X) masked, applied directly
                chunk_states_kernel    the state entering each chunk: S_<c over keys (forward and
                                       backward, recomputed), R_>c over queries (backward, reverse)
                apply_state_kernel     CHUNKED: row i against its chunk's state, added to the block's share
                block_query_backward_kernel / block_key_backward_kernel   in-chunk block's gradients

The state kernels run on a grid (batch heads, slabs, splits of n): a slab is a block of
monomials formed in registers from the row tile (triton_slabs), so B H alone does not set the
parallelism. The causal path is chunkwise parallel, as fast linear-attention kernels are: the only
serial part is chunk_states_kernel's walk over chunks (one program per slab, storing the state
entering every chunk, (BH, n_q / C, r, d_v + 1) float32), after which every row block is
independent. Each row's result is written by the one program that owns the row (the block kernel
stores, the chunked apply kernel adds): no atomics.

Tiles. The row tile (_block_size), the degree-2 slab width (SLAB_WIDTH) and, causal, the chunk
(kernel_chunk) default to fixed values; on a GPU where benchmarks/gpu_check.py timed the small
space lrcompile.kernels.triton_tuning.SPACE, the best recorded there for (d, degree, dtype, causal)
is used instead.

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
`forward`/`backward` fall back to the torch sweep (lrcompile.kernels.reference), whose state has
the same layout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from lrcompile.kernels import triton_tuning
from lrcompile.kernels.triton_blocks import (block_forward_kernel, block_key_backward_kernel,
                                             block_query_backward_kernel)
from lrcompile.kernels.triton_slabs import apply_state_kernel, chunk_states_kernel, state_kernel
from lrcompile.kernels.operands import append_ones as _append_ones
from lrcompile.kernels.operands import valid_mean_correction as _valid_mean_correction
from lrcompile.kernels.operands import with_key_weights as _weighted

MAX_DEGREE = 3
# The largest head dim d per degree. Degree 3 stops at 32: r = C(d + 3, 3) is 6545 rows of d_v + 1
# float32 there (1.7 MB a head at d_v = 64), and a causal call stores one state per chunk; at
# d = 64 it would be 47905 rows, 12 MB a head and chunk.
MAX_HEAD_DIM = {1: 128, 2: 128, 3: 32}
MAX_VALUE_DIM = 128
# Tile products per input dtype (module docstring, "Precision").
DOT_PRECISION_FOR_DTYPE = {torch.float32: "tf32x3", torch.float16: "fp16", torch.bfloat16: "bf16"}


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, coefficients) -> str | None:
    """Why the Triton kernels do not run this call, or None where they do."""
    degree, head_dim, value_dim = len(coefficients) - 1, q.shape[-1], v.shape[-1]
    accepted = ", ".join(f"d <= {d} at degree {g}" for g, d in MAX_HEAD_DIM.items())
    if degree not in MAX_HEAD_DIM:
        return f"degree {degree}; the Triton kernels accept 1 <= degree <= {MAX_DEGREE}"
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


def state_rows(head_dim: int, degree: int = 2) -> int:
    """Rows of the state: r = C(d + g, g), one per monomial of degree <= g (the torch sweep's feature_dim)."""
    return math.comb(head_dim + degree, degree)


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
    return not isinstance(state_kernel, triton.runtime.JITFunction)


def _tile(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _block_size(device: torch.device, head_dim: int, value_dim: int) -> int:
    """Rows per tile. Under the interpreter (CPU tensors) 16: it runs every program in Python.

    On CUDA, 64, or 32 past d or d_v = 64: the apply kernel holds (rows, D) and (rows, DV) float32
    accumulators beside a slab's (rows, S^m) features, and compiled for sm_90 the kernels spill at
    64-row tiles once D or DV is 128.
    """
    if device.type != "cuda":
        return 16
    return 64 if max(head_dim, value_dim) <= 64 else 32


# Column blocks of a slab per degree (triton_slabs): degree-2 slabs of S^2 = 64 monomials on a GPU
# (a 64-row state tile per product), 16 under the interpreter, where the tests' small heads (d = 4
# to 8) then span several blocks and off-diagonal slabs; degree-3 slabs of 4^3 = 64.
SLAB_WIDTH = {2: 8, 3: 4}
INTERPRETED_SLAB_WIDTH = {2: 4, 3: 4}
# Warps of the state kernels (triton_slabs). Compiled for sm_90 with bf16 operands at d = 64 (ptxas
# -v), 4 warps spill up to 1.1 KB a thread in the apply kernel that forms U and dk' together (its U,
# dx and Y accumulators beside a slab's features and state) and 48-132 B in the chunk walks; 8
# warps spill 0.2 KB there and nothing elsewhere. The block kernels spill nothing at the default 4.
STATE_KERNEL_WARPS = 8


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
    slab_widths: tuple[int, int] = (SLAB_WIDTH[2], SLAB_WIDTH[3])  # S_2, S_3

    @classmethod
    def of(cls, q, v, coefficients, block_size=None, causal=False):
        """The launch of one call; on CUDA with the tiles timed best on this GPU, where recorded."""
        degree = len(coefficients) - 1
        padded = tuple(float(c) for c in coefficients) + (0.0,) * (MAX_DEGREE - degree)
        precision = DOT_PRECISION_FOR_DTYPE[q.dtype]
        interpreted = _interpreted()
        if precision == "bf16" and interpreted:
            # the interpreter (Triton 3.9) multiplies bfloat16 tiles as raw integers; bfloat16 values
            # multiply exactly in float32, so rounding the operands and taking a float32 product is
            # the tensor cores' bfloat16 product with float32 accumulation
            precision = "bf16_in_fp32"
        widths = INTERPRETED_SLAB_WIDTH if interpreted else SLAB_WIDTH
        tuned = _tuned(q, degree, causal) or {}
        return cls(q.shape[-1], v.shape[-1], degree, padded,
                   block_size or tuned.get("block") or _block_size(q.device, q.shape[-1], v.shape[-1]), precision,
                   tuned.get("chunk"), (widths[2], widths[3]))

    def slab_width(self, power: int) -> int:
        """S_m: the degree-1 slab is the whole (D-wide) row tile."""
        return _tile(self.head_dim) if power == 1 else self.slab_widths[power - 2]

    def column_blocks(self, power: int) -> int:
        return triton.cdiv(self.head_dim, self.slab_width(power))

    def slab_count(self, power: int) -> int:
        """Slabs of degree `power`: the blocks I <= J (<= L) of column_blocks, C(nb + m - 1, m)."""
        return math.comb(self.column_blocks(power) + power - 1, power)

    @property
    def powers(self) -> range:
        return range(1, self.degree + 1)

    def constants(self, rows_only=False) -> dict:
        """The kernels' constexpr arguments (the state kernels take BLOCK_N only, the causal blocks BLOCK_M too)."""
        tiles = dict(BLOCK_N=self.block, D=_tile(self.head_dim), DV=_tile(self.value_dim),
                     DOT_PRECISION=self.dot_precision)
        return tiles if rows_only else dict(tiles, BLOCK_M=self.block)

    def polynomial(self) -> dict:
        """c_0..c_3 as the kernels' constexpr arguments C0..C3: a Python float argument would be typed
        fp64 by Inductor (and then meet float32 operands in tl.dot), so each polynomial compiles its own
        kernels instead, in which a zero c_3 folds away."""
        return dict(zip(("C0", "C1", "C2", "C3"), self.coefficients))

    def power_constants(self, power: int) -> dict:
        """The state kernels' constexprs for the slabs of degree `power`."""
        return dict(self.constants(rows_only=True), S=self.slab_width(power),
                    NBP=triton.next_power_of_2(self.column_blocks(power)), POWER=power)

    def apply_constants(self) -> dict:
        """The apply kernel's constexprs: every degree's slab width, the degree and the polynomial."""
        return dict(self.constants(rows_only=True), S2=self.slab_widths[0], S3=self.slab_widths[1],
                    DEGREE=self.degree, **self.polynomial())


def _features_state(x, y, launch: _Launch):
    """T = sum_j feat(x_j)^T Y_j for rows x (BH, n, d), Y (BH, n, d_v + 1): (BH, state_rows, d_v + 1).

    One launch per degree, each over its slabs; the rows are split across programs
    (_rows_per_split) and the partial states added here."""
    heads, n = x.shape[:2]
    d, d_v = launch.head_dim, launch.value_dim
    slabs = sum(launch.slab_count(power) for power in launch.powers)
    rows_per_split = _rows_per_split(n, heads * slabs, launch.block, x.device)
    splits = triton.cdiv(n, rows_per_split)
    partial = x.new_empty(heads, splits, state_rows(d, launch.degree), d_v + 1, dtype=torch.float32)
    for power in launch.powers:
        _launcher(state_kernel)[(heads, launch.slab_count(power), splits)](
            x, y, partial, n, d, d_v, launch.column_blocks(power), rows_per_split,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), partial.stride(0), partial.stride(1),
            **launch.power_constants(power), num_warps=STATE_KERNEL_WARPS)
    return partial[:, 0] if splits == 1 else partial.sum(1)


# Splits of n in the non-causal state kernel: enough programs to fill a GPU several times over
# (B H slabs alone is 8 x 37 = 296 at H = 8, d = 64, degree 2), each at least a few thousand rows
# long so the partial states (splits r (d_v + 1) floats) stay small against the rows read.
PROGRAMS_TO_FILL = 4 * 132  # four waves of an H100/H200's SMs
MIN_ROWS_PER_SPLIT = 2048
INTERPRETED_ROWS_PER_SPLIT = 32  # small enough that the tests' short sequences take the split path


def _rows_per_split(n: int, programs: int, block: int, device: torch.device) -> int:
    """Rows each state program sums: n, or less where B H slabs programs would leave SMs idle."""
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
    _launcher(apply_state_kernel)[(heads, triton.cdiv(n, launch.block))](
        x, state, y, u_arg, dx_arg, n, d, d_v, launch.column_blocks(2), launch.column_blocks(3), groups,
        chunk_size or 1, n_chunks, x.stride(0), x.stride(1), state.stride(0), chunk_stride, y.stride(0), y.stride(1),
        u_arg.stride(0), u_arg.stride(1), dx_arg.stride(0), dx_arg.stride(1),
        **launch.apply_constants(), STORE_U=store_u, GRADIENT=gradient, CHUNKED=chunked, ACCUMULATE=accumulate,
        num_warps=STATE_KERNEL_WARPS)
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
    for power in launch.powers:
        _launcher(chunk_states_kernel)[(heads, launch.slab_count(power))](
            x, y, states, total_arg, min(n_q, n), groups, d, d_v, chunk_size, states.shape[1],
            launch.column_blocks(power), *x.stride()[:3], *y.stride()[:3], states.stride(0), states.stride(1),
            total_arg.stride(0), **launch.power_constants(power), REVERSE=reverse, STORE_TOTAL=total is not None,
            num_warps=STATE_KERNEL_WARPS)
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

    The state is (B, H, state_rows(d, degree), d_v + 1) in the torch sweep's layout; where the call
    falls back to the torch op (`supports` is False), whatever that op returns.
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
    _launcher(block_forward_kernel)[(heads, groups, triton.cdiv(n_q, launch.block))](
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
    _launcher(block_query_backward_kernel)[(heads, groups, triton.cdiv(n_q, launch.block))](
        q_rows, k_rows, weighted, g_rows, dq, n_q, n_k, d, d_v, chunk_size,
        *inputs, *dq.stride()[:3], **launch.constants(), **launch.polynomial())
    _launcher(block_key_backward_kernel)[(heads, triton.cdiv(n_k, launch.block))](
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
