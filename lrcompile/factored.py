"""The factored polynomial-attention kernels: forward and an explicit backward, O(n r d_v).

Inputs arrive normalised by `lrcompile.attention` (compute dtype float32 or float64):

    q           (B, H, G, n_q, d)   G query heads share each key/value head (GQA); G = 1 otherwise
    k           (B, H, n_k, d)
    v           (B, H, n_k, d_v)
    key_weight  (B, H, n_k) or None  w_j >= 0 multiplies every weight of key j (key-padding mask)

With q' = sqrt(s) q, k' = sqrt(s) k - mu, the function computed is

    A_ij = w_j P(q'_i . k'_j) [j <= i if causal],    out_i = sum_j A_ij v_j / D_i,   D_i = sum_j A_ij

mu is the mean of the valid keys when non-causal: any vector shared by all keys leaves softmax
unchanged and centring shrinks the score range. Causal attention is not centred (mu = 0): a mean
over all keys would let later keys change earlier outputs, a leak of the future in training.

with P(q'.k') = phi(q') . psi(k') (see `lrcompile.features`; phi carries the coefficients, psi
none). Writing V^ = [V | 1] and W^ = w * V^ (the key weights never touch a feature):

Forward, non-causal.  S = sum_j psi(k'_j)^T W^_j   (r, d_v + 1);   O^ = phi(Q') S.
Forward, causal.      Chunks of C positions: inside a chunk A is applied directly (C x C);
                      across chunks a running S holds the keys of all earlier chunks.

Backward (derived once).  With dO given, let g_i = dO_i / D_i and G^_i = [g_i | -(dO_i . out_i) / D_i]
(the second entry is FlashAttention's "delta" term). Then
    dA_ij / w_j = G^_i . V^_j                                  (rank d_v + 1)
    dphi(q'_i) = sum_j dA_ij psi(k'_j) = S G^_i                (non-causal: S as in the forward)
    dpsi(k'_j) = R W^_j,   R = sum_i phi(q'_i)^T G^_i          (r, d_v + 1)
    U_j = R^T psi(k'_j):   dV_j = w_j U_j[:d_v],   dw_j = U_j . V^_j
and the feature maps' vector-Jacobian products turn dphi, dpsi into dq', dk'. Centring adds
dk'_j -> dk'_j - [j valid] sum_l dk'_l / n_valid (mu depends on the keys). Causally, query chunk
c sees the state S_<c of the keys of earlier chunks and key chunk c receives R_>c from the
queries of later chunks: one reverse sweep carries both, R growing by each query chunk and S
shrinking from the forward's total by each key chunk (S_<c = S - sum of later chunks' terms,
so no forward sweep is repeated); the in-chunk block is differentiated directly through
dX_ij = dA_ij w_j P'(x_ij).

Features are recomputed chunk by chunk in the backward instead of saved, into buffers allocated
once per call: memory stays O(n d + r d_v) per head, never an n x n or an n x r tensor. Per
chunk the work is a few large matrix products and one pass of the feature maps.

On the CPU the same sweeps also exist in C (lrcompile.native.Sweep, csrc/sweeps.h), one head per
core; `lrcompile.kernels` decides per call which runs (the op's `implementation` argument: "c"
or "torch"). The sweeps here are the reference the tests hold every other implementation to,
and the path wherever no other runs.

Short calls compute the same function directly, as one n x n block without features
(lrcompile.direct): the op asks `direct.uses_direct` in its forward and, from the same shapes,
in its backward. Under "c" the direct algorithm is one fused C call (native.DirectKernels).
"""

from __future__ import annotations

import functools

import torch

from lrcompile import direct, guard, kernels, native
from lrcompile.features import FeatureMap, MonomialTable, feature_dim, monomial_table
from lrcompile.threads import split_heads


# The op is registered with torch.library, forward and explicit backward as two custom ops, so
# that under torch.compile AOTAutograd's forward graph holds one `lrcompile.factored_attention`
# call and its backward graph one `lrcompile.factored_attention_backward` call: Inductor runs the
# same chunked kernels as eager mode, nothing unrolls with n, and sizes stay symbolic.


@torch.library.custom_op("lrcompile::factored_attention", mutates_args=())
def factored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int,
    max_error: float, on_inaccurate: str, site: str, implementation: str = "torch",
    log_key_weight: torch.Tensor | None = None, algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state S (B, H, r, d_v + 1), exact ()).

    Causally, S sums the keys every query can see at the end: the backward peels it chunk by chunk.
    Where the direct algorithm runs (lrcompile.direct) there is no state: S is (B, H, 0, d_v + 1).
    The accuracy guard (lrcompile.guard) checks `out` unless on_inaccurate is "allow"; `exact` is
    True when it replaced `out` by exact attention, which the backward then differentiates.
    `log_key_weight` (B, H, n_k): a causal float mask's log w = m - peak, given beside
    key_weight = e^{log w}: the guard detects rows whose weights underflow and computes exact
    attention from it; the gradient of a float mask then flows through it instead of key_weight.
    The backward checks its own gradients as the forward checks `out` (guard.check_backward).
    `algorithm`: "auto" asks lrcompile.direct's cost rule (a guard on the lengths under dynamic
    shapes); "factored" or "direct" fixes it (lrcompile.export under dynamic shapes: no guard).
    """
    core = _direct_core(q, k, v, coefficients, causal, chunk_size, algorithm)
    fused = core.native_kernel(q, k, scale) if core is not None and implementation == "c" else None
    if fused is not None:  # the direct algorithm, everything in one C call
        out, denominator = fused.forward(q.contiguous(), k.contiguous(), v.contiguous(), _contiguous(key_weight))
        state = q.new_empty(k.shape[:-2] + (0, v.shape[-1] + 1))  # no state
    else:
        sweeps = _Sweeps(q, coefficients, scale, causal, chunk_size, implementation)
        sweeps.direct = core
        k_centred = centre_keys(k, key_weight, scale, causal)[0]
        out, denominator, state = sweeps.forward(q * sweeps.root_scale, k_centred, _append_ones(v), key_weight)
    exact = guard.check(site, out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate, log_key_weight)
    if exact:
        out = guard.exact_attention(q, k, v, key_weight, scale, causal, log_weight=log_key_weight)
    # contiguous, as the fake kernel promises (the denominator is a column of a wider buffer)
    return out.contiguous(), denominator.contiguous(), state.contiguous(), torch.tensor(exact, device=q.device)


@factored_attention.register_fake
def _(q, k, v, key_weight, coefficients, scale, causal, chunk_size, max_error, on_inaccurate, site,
      implementation="torch", log_key_weight=None, algorithm="auto"):
    rows = _state_rows(q, k, v, coefficients, causal, chunk_size, algorithm)
    state = q.new_empty(k.shape[:-2] + (rows, v.shape[-1] + 1))
    exact = q.new_empty((), dtype=torch.bool)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1]), state, exact


@torch.library.custom_op("lrcompile::factored_attention_backward", mutates_args=())
def factored_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    out: torch.Tensor, denominator: torch.Tensor, state: torch.Tensor, exact: torch.Tensor,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int, key_weight_grad: bool,
    implementation: str = "torch", log_key_weight: torch.Tensor | None = None, max_error: float = 0.0,
    on_inaccurate: str = "allow", site: str = "", algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d key_weight); the last is empty unless key_weight_grad, and is d log_key_weight
    where log_key_weight is given. Unless the forward already returned exact attention, the guard
    checks the polynomial's gradients first (max_error, on_inaccurate, site: as the forward's)."""
    if exact.item() or guard.check_backward(site, grad_out, q, k, v, key_weight, coefficients, scale, causal,
                                            max_error, on_inaccurate):
        dq, dk, dv, dw = guard.exact_attention_backward(grad_out, q, k, v, key_weight, scale, causal, key_weight_grad,
                                                        log_weight=log_key_weight)
        dw = dw.contiguous() if key_weight_grad else q.new_empty(0)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dw
    dq, dk, dv, dw = _polynomial_backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale,
                                          causal, chunk_size, key_weight_grad, implementation, algorithm)
    if key_weight_grad and log_key_weight is not None:
        dw = dw * key_weight  # d/d log w = w d/dw
    return dq, dk, dv, dw


def _polynomial_backward(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale, causal,
                         chunk_size, key_weight_grad, implementation, algorithm):
    core = _direct_core(q, k, v, coefficients, causal, chunk_size, algorithm)  # as the forward chose
    fused = core.native_kernel(q, k, scale) if core is not None and implementation == "c" else None
    if fused is not None:
        dq, dk, dv, dw = fused.backward(grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                        _contiguous(key_weight), out.contiguous(), denominator.contiguous(),
                                        key_weight_grad)
        return dq, dk, dv, (dw if key_weight_grad else q.new_empty(0))
    sweeps = _Sweeps(q, coefficients, scale, causal, chunk_size, implementation)
    sweeps.direct = core
    sweeps.need_key_weight_grad = key_weight_grad
    k_centred, valid, valid_count = centre_keys(k, key_weight, scale, causal)
    g_hat = torch.cat([grad_out, -(grad_out * out).sum(-1, keepdim=True)], dim=-1) / _safe(denominator).unsqueeze(-1)
    # A fully masked row (D_i = 0) is the constant 0: nothing flows back from it.
    g_hat = g_hat.masked_fill((denominator == 0).unsqueeze(-1), 0.0)
    dq, dk, dv, dw = sweeps.backward(q * sweeps.root_scale, k_centred, _append_ones(v), key_weight, g_hat, state)
    if not causal:
        dk = dk - _valid_mean_correction(dk, valid, valid_count)
    dw = dw.contiguous() if key_weight_grad else q.new_empty(0)
    return (dq * sweeps.root_scale).contiguous(), (dk * sweeps.root_scale).contiguous(), dv.contiguous(), dw


@factored_attention_backward.register_fake
def _(grad_out, q, k, v, key_weight, out, denominator, state, exact, coefficients, scale, causal, chunk_size,
      key_weight_grad, implementation="torch", log_key_weight=None, max_error=0.0, on_inaccurate="allow", site="",
      algorithm="auto"):
    dw = key_weight.new_empty(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, coefficients, scale, causal, chunk_size, max_error, on_inaccurate, site, *rest = inputs
    implementation = rest[0] if rest else "torch"
    log_key_weight = rest[1] if len(rest) > 1 else None
    ctx.algorithm = rest[2] if len(rest) > 2 else "auto"
    out, denominator, state, exact = output
    ctx.save_for_backward(q, k, v, key_weight, out, denominator, state, exact, log_key_weight)
    ctx.config = (list(coefficients), scale, causal, chunk_size)
    ctx.guard = (max_error, on_inaccurate, site)
    ctx.implementation = implementation
    ctx.mark_non_differentiable(denominator, state, exact)


def _backward(ctx, grad_out, _grad_denominator, _grad_state, _grad_exact):
    q, k, v, key_weight, out, denominator, state, exact, log_key_weight = ctx.saved_tensors
    # A float mask's gradient flows through log_key_weight where that is given, else through key_weight.
    through_log = log_key_weight is not None
    key_weight_grad = key_weight is not None and ctx.needs_input_grad[12 if through_log else 3]
    dq, dk, dv, dw = torch.ops.lrcompile.factored_attention_backward(
        grad_out, q, k, v, key_weight, out, denominator, state, exact, *ctx.config, key_weight_grad,
        ctx.implementation, log_key_weight, *ctx.guard, ctx.algorithm)
    dw = dw if key_weight_grad else None
    return (dq, dk, dv, None if through_log else dw, None, None, None, None, None, None, None, None,
            dw if through_log else None, None)


factored_attention.register_autograd(_backward, setup_context=_setup_context)


def _uses_direct(q, k, v, coefficients, causal, chunk_size, algorithm="auto") -> bool:
    """Whether this call takes the direct algorithm (lrcompile.direct): a function of the shapes
    alone, asked by the forward, the fake kernel and the backward alike. Under dynamic shapes the
    fake kernel's answer is a guard on the lengths: a shape across the switch recompiles. A fixed
    `algorithm` ("direct" or "factored") decides without looking at the shapes."""
    if algorithm != "auto":
        return algorithm == "direct"
    groups, n_q, head_dim = q.shape[2:]
    return direct.uses_direct(n_q, k.shape[-2], head_dim, v.shape[-1], groups, len(coefficients) - 1, causal,
                              chunk_size, q.device.type)


def _direct_core(q, k, v, coefficients, causal, chunk_size, algorithm="auto") -> direct.Direct | None:
    """The direct algorithm where it is cheaper than the sweeps (or fixed so), else None."""
    uses = _uses_direct(q, k, v, coefficients, causal, chunk_size, algorithm)
    return direct.Direct(coefficients, causal, q) if uses else None


def _state_rows(q, k, v, coefficients, causal, chunk_size, algorithm="auto"):
    """Rows of the state output: r for the factored algorithm, 0 for the direct one (no state)."""
    if _uses_direct(q, k, v, coefficients, causal, chunk_size, algorithm):
        return 0
    return feature_dim(q.shape[-1], len(coefficients) - 1)


def _contiguous(t):
    return None if t is None else t.contiguous()


def centre_keys(k: torch.Tensor, key_weight: torch.Tensor | None, scale: float, causal: bool):
    """sqrt(s) k - mu, mu the mean over valid keys (w_j > 0), or 0 if causal.

    Returns (k', valid, n_valid); valid and n_valid are None where every key counts.
    """
    k_scaled = k * scale**0.5
    if causal:
        return k_scaled, None, None
    if key_weight is None:
        return k_scaled - k_scaled.mean(-2, keepdim=True), None, None
    valid = (key_weight > 0).to(k.dtype).unsqueeze(-1)  # (B, H, n_k, 1)
    valid_count = valid.sum(-2, keepdim=True).clamp_min(1)  # (B, H, 1, 1)
    mu = (valid * k_scaled).sum(-2, keepdim=True) / valid_count
    return k_scaled - mu, valid, valid_count


def _valid_mean_correction(dk_centred, valid, valid_count):
    if valid is None:
        return dk_centred.mean(-2, keepdim=True)
    return valid * dk_centred.sum(-2, keepdim=True) / valid_count


def _safe(denominator):
    return denominator.masked_fill(denominator == 0, 1.0)


def _append_ones(v):
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def _horner(coefficients, x):
    result = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result.mul_(x).add_(c)
    return result


def _spans(length, chunk_size):
    for start in range(0, length, chunk_size):
        yield start, min(start + chunk_size, length)


class _Sweeps:
    """One call's configuration, and the chunked sweeps over (BH, rows, .) tensors.

    Batch and key/value heads are flattened into BH. Query rows are the G query heads of a key
    head stacked: head-major (G n_q) when non-causal, where any split into chunks will do, and
    position-major (n_q G) when causal, so that a chunk of C positions is C G consecutive rows.
    Features are feature-major, (BH, r, rows), in buffers reused by every chunk.
    """

    def __init__(self, q, coefficients, scale, causal, chunk_size, implementation):
        if implementation not in ("c", "torch"):
            raise ValueError(f"lrcompile::factored_attention runs the 'c' or 'torch' implementation, got "
                             f"{implementation!r} (Triton has an op of its own: lrcompile.kernels)")
        self.implementation = implementation
        self.coefficients = tuple(coefficients)
        self.derivative = tuple(m * c for m, c in enumerate(self.coefficients))[1:] or (0.0,)
        self.table: MonomialTable = monomial_table(q.shape[-1], len(self.coefficients) - 1)
        in_c = implementation == "c"
        self.phi = FeatureMap(self.table, self.table.coefficients(self.coefficients, q.dtype, q.device), q, in_c)
        self.psi = FeatureMap(self.table, None, q, in_c)
        self.root_scale = scale**0.5
        self.causal = causal
        self.chunk_size = chunk_size
        self.need_key_weight_grad = False  # set by the backward when a float mask wants a gradient
        self.direct: direct.Direct | None = None  # set by the op where the direct algorithm is cheaper
        self._masks = {}
        self.polynomial = torch.tensor(self.coefficients, dtype=q.dtype)  # c_0..c_g, for the C kernels

    # ---- layout -------------------------------------------------------------------------------

    def query_rows(self, x):
        """(B, H, G, n_q, e) -> (BH, G n_q, e) non-causal, (BH, n_q G, e) causal."""
        batch, heads, groups, n_q, width = x.shape
        if self.causal:
            x = x.transpose(2, 3)
        return x.reshape(batch * heads, groups * n_q, width).contiguous()  # kernels want unit-stride rows

    def from_query_rows(self, rows, shape):
        """The inverse of query_rows, for rows (BH, G n_q or n_q G, e') and q's shape (B, H, G, n_q, .)."""
        batch, heads, groups, n_q = shape[:4]
        if self.causal:
            return rows.reshape(batch, heads, n_q, groups, -1).transpose(2, 3)
        return rows.reshape(batch, heads, groups, n_q, -1)

    def buffer(self, like, rows):
        """A feature block (BH, r, rows), reused by every chunk of a sweep."""
        return like.new_empty(like.shape[0], self.table.feature_dim, rows)

    # (r, d_v + 1) states and (rows, d_v + 1) outputs are column-major: with d_v + 1 = 65 columns,
    # MKL's products run 6-20% faster that way round (benchmarks/kernel_paths.py).

    def new_state(self, like, columns):
        """A zero state (BH, r, columns), for the BH of `like`."""
        return like.new_zeros(like.shape[0], columns, self.table.feature_dim).mT

    @staticmethod
    def new_rows(like, rows, columns, zero=False):
        make = like.new_zeros if zero else like.new_empty
        return make(like.shape[0], columns, rows).mT  # (BH, rows, columns)

    # ---- entry points -------------------------------------------------------------------------

    def native_sweep(self, rows):
        """The C sweep (lrcompile.native.Sweep) where lrcompile.kernels says it runs; else None, and the
        sweeps below run."""
        if self.phi.native is None or kernels.sweep(self.implementation, rows.shape[0], rows.dtype) != "c":
            return None
        return native.sweep(self.phi.native, self.polynomial, self.chunk_size, self.causal, rows)

    def forward(self, q, k, v_hat, key_weight):
        batch, heads, groups = q.shape[:3]
        rows, keys = self.query_rows(q), k.flatten(0, 1).contiguous()
        weighted = _weighted(v_hat, key_weight).flatten(0, 1).contiguous()  # W^ (BH, n_k, d_v + 1)
        in_c = None if self.direct is not None else self.native_sweep(rows)
        if self.direct is not None:  # no state
            out_hat = self.direct.forward(rows, keys, weighted, groups)
            state = rows.new_empty(keys.shape[0], 0, weighted.shape[-1])
        elif in_c is not None:
            out_t, state_t = in_c.forward(rows, keys, weighted, groups)
            out_hat, state = out_t.mT, state_t.mT
        elif self.causal:
            out_hat, state = split_heads(functools.partial(self.causal_forward, groups=groups), rows, keys, weighted)
        else:
            out_hat, state = split_heads(self.non_causal_forward, rows, keys, weighted)
        out_hat = self.from_query_rows(out_hat, q.shape)  # (B, H, G, n_q, d_v + 1)
        denominator = out_hat[..., -1]
        # D_i = 0 only where every key row i sees has weight 0 (fully masked): its numerator is 0
        # too, and the row is 0, as SDPA gives for a query with no key to attend to.
        out = out_hat[..., :-1] / _safe(denominator).unsqueeze(-1)
        return out, denominator, state.unflatten(0, (batch, heads))

    def backward(self, q, k, v_hat, key_weight, g_hat, state):
        groups = q.shape[2]
        rows, g_rows, keys = self.query_rows(q), self.query_rows(g_hat), k.flatten(0, 1).contiguous()
        weighted = _weighted(v_hat, key_weight).flatten(0, 1).contiguous()
        state = state.flatten(0, 1)
        in_c = None if self.direct is not None else self.native_sweep(rows)
        if self.direct is not None:
            dq, dk, key_grads = self.direct.backward(rows, keys, weighted, g_rows, groups)
        elif in_c is not None:
            dq, dk, key_grads_t = in_c.backward(rows, keys, weighted, g_rows, state.mT.contiguous(), groups)
            key_grads = key_grads_t.mT
        elif self.causal:
            dq, dk, key_grads = split_heads(functools.partial(self.causal_backward, groups=groups),
                                            rows, keys, weighted, g_rows, state)
        else:
            dq, dk, key_grads = split_heads(self.non_causal_backward, rows, keys, weighted, g_rows, state)
        # U_j = R^T psi(k'_j) (plus the in-chunk share): dV_j = w_j U_j[:d_v], dw_j = U_j . V^_j
        key_grads = key_grads.unflatten(0, k.shape[:2])  # (B, H, n_k, d_v + 1)
        dv = _weighted(key_grads[..., :-1], key_weight)
        dw = (key_grads * v_hat).sum(-1) if self.need_key_weight_grad else None
        return self.from_query_rows(dq, q.shape), dk.unflatten(0, k.shape[:2]), dv, dw

    # ---- non-causal ---------------------------------------------------------------------------

    def non_causal_forward(self, rows, keys, weighted):
        state = self.key_state(keys, weighted)
        return self.query_outputs(rows, state), state

    def non_causal_backward(self, rows, keys, weighted, g_rows, state):
        dq, query_state = self.query_gradients(rows, g_rows, state)
        return (dq,) + self.key_gradients(keys, weighted, query_state)

    def key_state(self, keys, weighted):
        """S = sum_j psi(k'_j)^T W^_j: (BH, r, d_v + 1)."""
        state = self.new_state(keys, weighted.shape[-1])
        psi = self.buffer(keys, min(self.chunk_size, keys.shape[1]))
        for a, b in _spans(keys.shape[1], self.chunk_size):
            state.baddbmm_(self.psi(keys[:, a:b], psi[..., :b - a]), weighted[:, a:b])
        return state

    def query_outputs(self, rows, state):
        """O^ = phi(Q') S: (BH, rows, d_v + 1)."""
        out_hat = self.new_rows(rows, rows.shape[1], state.shape[-1])
        phi = self.buffer(rows, min(self.chunk_size, rows.shape[1]))
        for a, b in _spans(rows.shape[1], self.chunk_size):
            torch.bmm(self.phi(rows[:, a:b], phi[..., :b - a]).mT, state, out=out_hat[:, a:b])
        return out_hat

    def query_gradients(self, rows, g_rows, state):
        """dq' rows from dphi = S G^, and R = sum_i phi(q'_i)^T G^_i."""
        query_state = self.new_state(rows, state.shape[-1])
        dq = torch.empty_like(rows)
        phi, d_phi = (self.buffer(rows, min(self.chunk_size, rows.shape[1])) for _ in range(2))
        for a, b in _spans(rows.shape[1], self.chunk_size):
            query_state.baddbmm_(self.phi(rows[:, a:b], phi[..., :b - a]), g_rows[:, a:b])
            torch.bmm(state, g_rows[:, a:b].mT, out=d_phi[..., :b - a])
            self.phi.backward(rows[:, a:b], d_phi[..., :b - a], dq[:, a:b])
        return dq, query_state

    def key_gradients(self, keys, weighted, query_state):
        """dk' from dpsi = R W^, and U = psi R for every key: (BH, n_k, d), (BH, n_k, d_v + 1)."""
        dk = torch.empty_like(keys)
        key_grads = self.new_rows(keys, keys.shape[1], weighted.shape[-1])
        psi, d_psi = (self.buffer(keys, min(self.chunk_size, keys.shape[1])) for _ in range(2))
        for a, b in _spans(keys.shape[1], self.chunk_size):
            torch.bmm(self.psi(keys[:, a:b], psi[..., :b - a]).mT, query_state, out=key_grads[:, a:b])
            torch.bmm(query_state, weighted[:, a:b].mT, out=d_psi[..., :b - a])
            self.psi.backward(keys[:, a:b], d_psi[..., :b - a], dk[:, a:b])
        return dk, key_grads

    # ---- causal -------------------------------------------------------------------------------
    # Position i of the queries and position j of the keys are aligned top-left, as in SDPA:
    # query i sees key j iff j <= i. Chunk c holds query positions [a, b) and key positions
    # [min(a, n_k), min(b, n_k)); keys past n_q are never seen.

    def chunks(self, n_q, n_k):
        for a, b in _spans(n_q, self.chunk_size):
            yield a, b, min(a, n_k), min(b, n_k)

    def causal_forward(self, rows, keys, weighted, groups):
        n_q, n_k = rows.shape[1] // groups, keys.shape[1]
        state = self.new_state(keys, weighted.shape[-1])
        out_hat = self.new_rows(rows, rows.shape[1], weighted.shape[-1])
        phi = self.buffer(rows, min(self.chunk_size, n_q) * groups)
        psi = self.buffer(keys, min(self.chunk_size, n_k))
        for a, b, ka, kb in self.chunks(n_q, n_k):
            q_rows, out_rows = rows[:, a * groups:b * groups], out_hat[:, a * groups:b * groups]
            torch.bmm(self.phi(q_rows, phi[..., :q_rows.shape[1]]).mT, state, out=out_rows)  # earlier chunks
            if kb > ka:
                block = self.in_chunk_block(q_rows, keys[:, ka:kb], a - ka, groups)  # (BH, C G, C_k)
                out_rows.baddbmm_(block, weighted[:, ka:kb])
                state.baddbmm_(self.psi(keys[:, ka:kb], psi[..., :kb - ka]), weighted[:, ka:kb])
        return out_hat, state

    def causal_backward(self, rows, keys, weighted, g_rows, state, groups):
        n_q, n_k = rows.shape[1] // groups, keys.shape[1]
        state = self.new_state(keys, weighted.shape[-1]).copy_(state)  # all keys; peeled to S_<c
        query_state = self.new_state(rows, weighted.shape[-1])  # R_>c, grown chunk by chunk
        dq = torch.empty_like(rows)
        dk = torch.zeros_like(keys)  # keys past the last query stay zero: nothing sees them
        key_grads = self.new_rows(keys, n_k, weighted.shape[-1], zero=True)
        phi = self.buffer(rows, min(self.chunk_size, n_q) * groups)
        psi = self.buffer(keys, min(self.chunk_size, n_k))
        d_features = self.buffer(rows, max(phi.shape[-1], psi.shape[-1]))
        for a, b, ka, kb in reversed(list(self.chunks(n_q, n_k))):
            q_rows, g_chunk = rows[:, a * groups:b * groups], g_rows[:, a * groups:b * groups]
            if kb > ka:  # this chunk's keys: seen by later chunks through R, and in the block below
                k_rows, w_rows = keys[:, ka:kb], weighted[:, ka:kb]
                psi_c = self.psi(k_rows, psi[..., :kb - ka])
                state.baddbmm_(psi_c, w_rows, alpha=-1)  # now S_<c
                torch.bmm(psi_c.mT, query_state, out=key_grads[:, ka:kb])
                d_psi = torch.bmm(query_state, w_rows.mT, out=d_features[..., :kb - ka])
                self.psi.backward(k_rows, d_psi, dk[:, ka:kb])
            phi_c = self.phi(q_rows, phi[..., :q_rows.shape[1]])
            d_phi = torch.bmm(state, g_chunk.mT, out=d_features[..., :q_rows.shape[1]])
            self.phi.backward(q_rows, d_phi, dq[:, a * groups:b * groups])
            if kb > ka:
                self.in_chunk_backward(q_rows, g_chunk, k_rows, w_rows, a - ka, groups,
                                       dq[:, a * groups:b * groups], dk[:, ka:kb], key_grads[:, ka:kb])
            query_state.baddbmm_(phi_c, g_chunk)  # now R_>=c, what earlier chunks' keys receive
        return dq, dk, key_grads

    def in_chunk_block(self, q_rows, k_rows, offset, groups, d_block=None):
        """The block A = P(X) * M of one chunk, X = q' k'^T (BH, C G, C_k), M its causal mask.

        With d_block = dL/dA (same shape), turns it into dL/dX = dL/dA * M * P'(X) in place.
        """
        scores = torch.bmm(q_rows, k_rows.mT)
        if self.psi.native is not None:  # natively wherever the feature maps run natively
            native.causal_block(scores, d_block, offset, groups, self.polynomial)
            return scores
        mask = self.in_chunk_mask(q_rows.shape[1] // groups, offset, k_rows.shape[1], groups, scores)
        if d_block is not None:
            d_block.mul_(mask).mul_(_horner(self.derivative, scores))
        return _horner(self.coefficients, scores).mul_(mask)

    def in_chunk_mask(self, positions, offset, keys, groups, like):
        """(positions G, keys): 1 where query position offset + i // G >= key position j."""
        key = (positions, offset, keys, groups, like.dtype, like.device)
        if key not in self._masks:
            rows = torch.arange(offset, offset + positions, device=like.device).repeat_interleave(groups)
            self._masks[key] = (rows[:, None] >= torch.arange(keys, device=like.device)).to(like.dtype)
        return self._masks[key]

    def in_chunk_backward(self, q_rows, g_chunk, k_rows, w_rows, offset, groups, dq, dk, key_grads):
        """The C G x C_k block (times w, inside W^), added to dq', dk' and U."""
        d_scores = torch.bmm(g_chunk, w_rows.mT)  # dL/dA, made dL/dX below
        block = self.in_chunk_block(q_rows, k_rows, offset, groups, d_scores)
        dq.baddbmm_(d_scores, k_rows)
        dk.baddbmm_(d_scores.mT, q_rows)
        key_grads.baddbmm_(block.mT, g_chunk)


def _weighted(rows, key_weight):
    """Rows (B, H, n_k, e) times their key weights (B, H, n_k)."""
    return rows if key_weight is None else rows * key_weight.unsqueeze(-1)

