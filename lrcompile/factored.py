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

with P(q'.k') = phi(q') . psi(k') (see `lrcompile.features`). Writing V^ = [V | 1]:

Forward, non-causal.  S = sum_j w_j psi(k'_j)^T V^_j   (r, d_v + 1);   O^ = phi(Q') S.
Forward, causal.      Chunks of C positions: inside a chunk A is applied directly (C x C);
                      across chunks a running S holds the keys of all earlier chunks.

Backward (derived once).  With dO given, let g_i = dO_i / D_i and G^_i = [g_i | -(dO_i . out_i) / D_i]
(the second entry is FlashAttention's "delta" term). Then
    dA_ij = G^_i . V^_j                                        (rank d_v + 1)
    dV_j  = sum_i A_ij g_i
    dphi(q'_i) = sum_j dA_ij w_j psi(k'_j) = G^_i S^T          (non-causal: S as in the forward)
    d[w_j psi(k'_j)] = V^_j R^T,   R = sum_i phi(q'_i)^T G^_i  (r, d_v + 1)
    dV_j  = w_j psi(k'_j) R[:, :d_v]
and the feature maps' vector-Jacobian products turn dphi, dpsi into dq', dk'. Centring adds
dk'_j -> dk'_j - [j valid] sum_l dk'_l / n_valid (mu depends on the keys). Causally, each
query chunk sees the state S of earlier chunks (a forward sweep rebuilds it) and each key chunk
receives R from later query chunks (a reverse sweep accumulates it); the in-chunk block is
differentiated directly through dX_ij = dA_ij w_j P'(x_ij).

Features are recomputed chunk by chunk in the backward instead of saved: memory stays
O(n d + r d_v) per head, never an n x n or an n x r tensor.
"""

from __future__ import annotations

import torch

from lrcompile.features import MonomialTable, feature_dim, monomial_table, monomials_backward_t, monomials_t


# The op is registered with torch.library, forward and explicit backward as two custom ops, so
# that under torch.compile AOTAutograd's forward graph holds one `lrcompile.factored_attention`
# call and its backward graph one `lrcompile.factored_attention_backward` call: Inductor runs the
# same chunked kernels as eager mode, nothing unrolls with n, and sizes stay symbolic.


@torch.library.custom_op("lrcompile::factored_attention", mutates_args=())
def factored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state (B, H, r, d_v + 1); empty if causal)."""
    kernel = _Kernel(q, coefficients, scale, causal, chunk_size)
    k_centred = centre_keys(k, key_weight, scale, causal)[0]
    v_hat = _append_ones(v)
    if causal:
        out, denominator = kernel.causal_forward(q * kernel.root_scale, k_centred, v_hat, key_weight)
        state = q.new_empty(0)  # the backward rebuilds the running state
    else:
        out, denominator, state = kernel.forward(q * kernel.root_scale, k_centred, v_hat, key_weight)
    # contiguous, as the fake kernel promises (the denominator is a column of a wider buffer)
    return out.contiguous(), denominator.contiguous(), state.contiguous()


@factored_attention.register_fake
def _(q, k, v, key_weight, coefficients, scale, causal, chunk_size):
    r = feature_dim(q.shape[-1], len(coefficients) - 1)
    state = q.new_empty(0) if causal else q.new_empty(k.shape[:-2] + (r, v.shape[-1] + 1))
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1]), state


@torch.library.custom_op("lrcompile::factored_attention_backward", mutates_args=())
def factored_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    out: torch.Tensor, denominator: torch.Tensor, state: torch.Tensor,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int, key_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d key_weight); the last is empty unless key_weight_grad."""
    kernel = _Kernel(q, coefficients, scale, causal, chunk_size)
    kernel.need_key_weight_grad = key_weight_grad
    k_centred, valid, valid_count = centre_keys(k, key_weight, scale, causal)
    g_hat = torch.cat([grad_out, -(grad_out * out).sum(-1, keepdim=True)], dim=-1) / denominator.unsqueeze(-1)
    q_scaled = q * kernel.root_scale  # g_hat: (B, H, G, n_q, d_v + 1)
    v_hat = _append_ones(v)
    if causal:
        dq, dk_centred, dv, dw = kernel.causal_backward(q_scaled, k_centred, v_hat, key_weight, g_hat)
        dk = dk_centred
    else:
        dq, dk_centred, dv, dw = kernel.backward(q_scaled, k_centred, v_hat, key_weight, g_hat, state)
        dk = dk_centred - _valid_mean_correction(dk_centred, valid, valid_count)
    dw = dw.contiguous() if key_weight_grad else q.new_empty(0)
    return (dq * kernel.root_scale).contiguous(), (dk * kernel.root_scale).contiguous(), dv.contiguous(), dw


@factored_attention_backward.register_fake
def _(grad_out, q, k, v, key_weight, out, denominator, state, coefficients, scale, causal, chunk_size, key_weight_grad):
    dw = key_weight.new_empty(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, coefficients, scale, causal, chunk_size = inputs
    out, denominator, state = output
    ctx.save_for_backward(q, k, v, key_weight, out, denominator, state)
    ctx.config = (list(coefficients), scale, causal, chunk_size)
    ctx.mark_non_differentiable(denominator, state)


def _backward(ctx, grad_out, _grad_denominator, _grad_state):
    q, k, v, key_weight, out, denominator, state = ctx.saved_tensors
    key_weight_grad = key_weight is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dw = torch.ops.lrcompile.factored_attention_backward(
        grad_out, q, k, v, key_weight, out, denominator, state, *ctx.config, key_weight_grad)
    return dq, dk, dv, (dw if key_weight_grad else None), None, None, None, None


factored_attention.register_autograd(_backward, setup_context=_setup_context)


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


def _append_ones(v):
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def _horner(coefficients, x):
    result = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * x + c
    return result


def _weighted(features_t, key_weight, start, stop):
    """Multiply key columns start:stop of (B, H, r, C) feature-major features by their weights."""
    if key_weight is None:
        return features_t
    return features_t * key_weight[..., None, start:stop]


class _Kernel:
    """The non-tensor configuration of one call, and the chunked sweeps.

    Features are feature-major: (B, H, r, C) for a chunk of C rows. The query-side coefficients
    of phi never touch an n-sized tensor: phi(q) S = mono(q) (c * S) and
    phi^T G^ = c * (mono^T G^), so they scale the (r, d_v + 1) states instead.
    """

    def __init__(self, q, coefficients, scale, causal, chunk_size):
        self.coefficients = tuple(coefficients)
        self.derivative = tuple(m * c for m, c in enumerate(self.coefficients))[1:] or (0.0,)
        self.table: MonomialTable = monomial_table(q.shape[-1], len(self.coefficients) - 1)
        self.feature_coefficients = self.table.coefficients(self.coefficients, q.dtype, q.device)[:, None]  # (r, 1)
        self.scale = scale
        self.root_scale = scale**0.5
        self.causal = causal
        self.chunk = chunk_size
        self.need_key_weight_grad = False  # set by the backward when a float mask wants a gradient

    def mono_t(self, rows):
        return monomials_t(rows.mT, self.table)

    def query_backward(self, q_rows, d_mono_t, monomials=None):
        """dq' rows (B, H, C, d) from dL/dmono(q) (B, H, r, C)."""
        return monomials_backward_t(q_rows.mT, d_mono_t, self.table, monomials).mT

    # ---- non-causal -------------------------------------------------------------------------

    def forward(self, q, k, v_hat, key_weight):
        batch, heads, groups, n_q, d = q.shape
        state = self.key_state(k, v_hat, key_weight, 0, k.shape[-2])  # (B, H, r, d_v + 1)
        rows = q.reshape(batch, heads, groups * n_q, d)
        query_state = state * self.feature_coefficients
        out_hat = torch.cat([self.mono_t(chunk).mT @ query_state for chunk in rows.split(self.chunk, dim=-2)], dim=-2)
        out_hat = out_hat.unflatten(-2, (groups, n_q))  # (B, H, G, n_q, d_v + 1)
        denominator = out_hat[..., -1]
        return out_hat[..., :-1] / denominator.unsqueeze(-1), denominator, state

    def key_state(self, k, v_hat, key_weight, start, stop):
        """sum over keys start:stop of w_j psi(k_j)^T [v_j | 1], chunk by chunk: (B, H, r, d_v + 1)."""
        state = None
        for a in range(start, stop, self.chunk):
            b = min(a + self.chunk, stop)
            psi_t = _weighted(monomials_t(k[..., a:b, :].mT, self.table), key_weight, a, b)  # (B, H, r, C)
            term = psi_t @ v_hat[..., a:b, :]
            state = term if state is None else state + term
        return state

    def backward(self, q, k, v_hat, key_weight, g_hat, state):
        batch, heads, groups, n_q, d = q.shape
        rows = q.reshape(batch, heads, groups * n_q, d)
        g_rows = g_hat.reshape(batch, heads, groups * n_q, -1)
        query_state = state * self.feature_coefficients
        reverse_state, dq_chunks = None, []
        for q_chunk, g_chunk in zip(rows.split(self.chunk, dim=-2), g_rows.split(self.chunk, dim=-2)):
            mono_t = self.mono_t(q_chunk)  # (B, H, r, C)
            term = mono_t @ g_chunk
            reverse_state = term if reverse_state is None else reverse_state + term
            dq_chunks.append(self.query_backward(q_chunk, query_state @ g_chunk.mT, mono_t))
        reverse_state = reverse_state * self.feature_coefficients
        dq = torch.cat(dq_chunks, dim=-2).reshape(q.shape)
        dk, dv, dw = self.key_gradients(k, v_hat, key_weight, reverse_state, 0, k.shape[-2])
        return dq, dk, dv, dw

    def key_gradients(self, k, v_hat, key_weight, reverse_state, start, stop):
        """dk', dv, dw for keys start:stop, given R = sum over the queries that see them of phi^T G^."""
        d_v = v_hat.shape[-1] - 1
        dk, dv, dw = [], [], []
        for a in range(start, stop, self.chunk):
            b = min(a + self.chunk, stop)
            k_t = k[..., a:b, :].mT
            psi_t = monomials_t(k_t, self.table)  # (B, H, r, C)
            d_weighted_psi_t = reverse_state @ v_hat[..., a:b, :].mT  # (B, H, r, C)
            dv.append(_weighted(psi_t, key_weight, a, b).mT @ reverse_state[..., :d_v])
            d_psi_t = _weighted(d_weighted_psi_t, key_weight, a, b)
            dk.append(monomials_backward_t(k_t, d_psi_t, self.table, psi_t).mT)
            dw.append((d_weighted_psi_t * psi_t).sum(-2) if self.need_key_weight_grad else None)
        dw = torch.cat(dw, dim=-1) if self.need_key_weight_grad else None
        return torch.cat(dk, dim=-2), torch.cat(dv, dim=-2), dw

    # ---- causal -----------------------------------------------------------------------------
    # Position i of the queries and position j of the keys are aligned top-left, as in SDPA:
    # query i sees key j iff j <= i. Chunk c holds query positions [a, b) and key positions
    # [min(a, n_k), min(b, n_k)); keys past n_q are never seen.

    def chunks(self, n_q, n_k):
        for a in range(0, n_q, self.chunk):
            b = min(a + self.chunk, n_q)
            yield a, b, min(a, n_k), min(b, n_k)

    def in_chunk_mask(self, a, b, key_start, key_stop, groups, device):
        """(G * C_q, C_k) bool: query position >= key position, tiled over the G query heads."""
        mask = torch.arange(a, b, device=device)[:, None] >= torch.arange(key_start, key_stop, device=device)
        return mask.repeat(groups, 1)

    def causal_forward(self, q, k, v_hat, key_weight):
        batch, heads, groups, n_q, d = q.shape
        state = q.new_zeros(batch, heads, self.table.feature_dim, v_hat.shape[-1])
        out_hat = []
        for a, b, ka, kb in self.chunks(n_q, k.shape[-2]):
            q_rows = q[..., a:b, :].reshape(batch, heads, groups * (b - a), d)
            chunk_out = self.mono_t(q_rows).mT @ (state * self.feature_coefficients)  # earlier chunks, through the state
            if kb > ka:
                _, p_scores, mask_weight = self.in_chunk_weights(q_rows, k, key_weight, a, b, ka, kb)
                chunk_out = chunk_out + (p_scores * mask_weight) @ v_hat[..., ka:kb, :]
                state = state + self.key_state(k, v_hat, key_weight, ka, kb)
            out_hat.append(chunk_out.unflatten(-2, (groups, b - a)))
        out_hat = torch.cat(out_hat, dim=-2)  # (B, H, G, n_q, d_v + 1)
        denominator = out_hat[..., -1]
        return out_hat[..., :-1] / denominator.unsqueeze(-1), denominator

    def in_chunk_weights(self, q_rows, k, key_weight, a, b, ka, kb):
        """One chunk's block: scores X = q k^T, P(X) and mask * w, each (B, H, G C_q, C_k)."""
        scores = q_rows @ k[..., ka:kb, :].mT
        mask = self.in_chunk_mask(a, b, ka, kb, q_rows.shape[-2] // (b - a), q_rows.device)
        mask_weight = mask.to(q_rows.dtype)
        if key_weight is not None:
            mask_weight = mask_weight * key_weight[..., None, ka:kb]
        return scores, _horner(self.coefficients, scores), mask_weight

    def causal_backward(self, q, k, v_hat, key_weight, g_hat):
        batch, heads, groups, n_q, d = q.shape
        n_k, d_v = k.shape[-2], v_hat.shape[-1] - 1
        chunks = list(self.chunks(n_q, n_k))

        # Forward sweep: each query chunk's dq through the state of earlier keys and through the
        # in-chunk block; the block's share of dk', dv, dw waits for the reverse sweep.
        state = q.new_zeros(batch, heads, self.table.feature_dim, d_v + 1)
        dq, in_chunk = [], []
        for a, b, ka, kb in chunks:
            q_rows = q[..., a:b, :].reshape(batch, heads, groups * (b - a), d)
            g_rows = g_hat[..., a:b, :].reshape(batch, heads, groups * (b - a), d_v + 1)
            dq_rows = self.query_backward(q_rows, (state * self.feature_coefficients) @ g_rows.mT)
            block = None
            if kb > ka:
                scores, p_scores, mask_weight = self.in_chunk_weights(q_rows, k, key_weight, a, b, ka, kb)
                weights = p_scores * mask_weight  # A
                d_weights = g_rows @ v_hat[..., ka:kb, :].mT  # dA
                d_scores = d_weights * mask_weight * _horner(self.derivative, scores)
                dq_rows = dq_rows + d_scores @ k[..., ka:kb, :]
                block = [d_scores.mT @ q_rows, weights.mT @ g_rows[..., :d_v], None]
                if self.need_key_weight_grad:
                    mask = self.in_chunk_mask(a, b, ka, kb, groups, q.device)
                    block[2] = (d_weights * p_scores * mask).sum(-2)
                state = state + self.key_state(k, v_hat, key_weight, ka, kb)
            in_chunk.append(block)
            dq.append(dq_rows.unflatten(-2, (groups, b - a)))

        # Reverse sweep: R accumulates phi^T G^ over later query chunks, which see every key of
        # this chunk through the state.
        reverse_state = q.new_zeros(batch, heads, self.table.feature_dim, d_v + 1)
        dk, dv, dw = [], [], []
        for (a, b, ka, kb), block in zip(reversed(chunks), reversed(in_chunk)):
            if block is not None:
                dk_c, dv_c, dw_c = self.key_gradients(k, v_hat, key_weight, reverse_state, ka, kb)
                dk.append(dk_c + block[0])
                dv.append(dv_c + block[1])
                dw.append(dw_c + block[2] if block[2] is not None else dw_c)
            q_rows = q[..., a:b, :].reshape(batch, heads, groups * (b - a), d)
            g_rows = g_hat[..., a:b, :].reshape(batch, heads, groups * (b - a), d_v + 1)
            reverse_state = reverse_state + (self.mono_t(q_rows) @ g_rows) * self.feature_coefficients
        unseen = n_k - min(n_q, n_k)  # keys past the last query: no query sees them
        if unseen:
            dk.insert(0, k.new_zeros(batch, heads, unseen, d))
            dv.insert(0, k.new_zeros(batch, heads, unseen, d_v))
            dw.insert(0, k.new_zeros(batch, heads, unseen) if self.need_key_weight_grad else None)
        dk, dv = torch.cat(dk[::-1], dim=-2), torch.cat(dv[::-1], dim=-2)
        dw = torch.cat(dw[::-1], dim=-1) if self.need_key_weight_grad else None
        return torch.cat(dq, dim=-2), dk, dv, dw
