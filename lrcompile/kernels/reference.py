"""The reference kernels: the factored polynomial attention in torch, forward and an explicit backward, O(n r d_v).

Inputs arrive normalised by `lrcompile.ops.attention` (compute dtype float32 or float64):

    q           (B, H, G, n_q, d)   G query heads share each key/value head (GQA); G = 1 otherwise
    k           (B, H, n_k, d)
    v           (B, H, n_k, d_v)
    key_weight  (B, H, n_k) or None  w_j >= 0 multiplies every weight of key j (key-padding mask)

With q' = sqrt(s) q, k' = sqrt(s) k - mu, the function computed is

    A_ij = w_j P(q'_i . k'_j) [j <= i if causal],    out_i = sum_j A_ij v_j / D_i,   D_i = sum_j A_ij

mu is the mean of the valid keys when non-causal: any vector shared by all keys leaves softmax
unchanged and centring shrinks the score range. Causal attention is not centred (mu = 0): a mean
over all keys would let later keys change earlier outputs, a leak of the future in training.

with P(q'.k') = phi(q') . psi(k') (see `lrcompile.math.features`; phi carries the coefficients, psi
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

This module fills in the kernel interface (`forward`, `backward`: lrcompile.kernels.interface)
with torch operations: the reference the tests hold every other implementation to, and the path
wherever no other runs. The C implementation (lrcompile.kernels.cpu) runs the same `Sweeps` with
its feature maps and in-chunk polynomial in C where it cannot run whole sweeps in C; the operands
all three share (centring, V^, W^, G^'s parts) are lrcompile.kernels.operands.

Short calls compute the same function directly, as one n x n block without features (`Direct`
below): the caller asks for it (`direct=True`, decided by lrcompile.ops.algorithm from the shapes,
forward and backward alike). The custom ops that run these kernels are lrcompile.ops.factored_op.
"""

from __future__ import annotations

import functools

import torch

from lrcompile.kernels.interface import KernelConfig
from lrcompile.kernels.operands import append_ones, centre_keys, safe, valid_mean_correction, with_key_weights
from lrcompile.kernels.threads import split_heads
from lrcompile.math.features import FeatureMap, MonomialTable, monomial_table


def forward(q, k, v, key_weight, config: KernelConfig, scale: float, causal: bool, direct: bool = False):
    """(out, denominator, state): the interface's forward (lrcompile.kernels.interface.Kernels) in torch."""
    return sweep_forward(Sweeps(q, config.coefficients, scale, causal, config.chunk_size, direct), q, k, v, key_weight)


def backward(grad_out, q, k, v, key_weight, out, denominator, state, config: KernelConfig, scale: float,
             causal: bool, direct: bool, key_weight_grad: bool):
    """(dq, dk, dv, d key_weight): the interface's backward in torch; the last is empty unless key_weight_grad."""
    sweeps = Sweeps(q, config.coefficients, scale, causal, config.chunk_size, direct)
    return sweep_backward(sweeps, grad_out, q, k, v, key_weight, out, denominator, state, key_weight_grad)


def sweep_forward(sweeps: Sweeps, q, k, v, key_weight):
    """The forward of any `Sweeps` (this module's, or one with C parts) on the interface's inputs."""
    k_centred = centre_keys(k, key_weight, sweeps.scale, sweeps.causal)[0]
    return sweeps.forward(q * sweeps.root_scale, k_centred, append_ones(v), key_weight)


def sweep_backward(sweeps: Sweeps, grad_out, q, k, v, key_weight, out, denominator, state, key_weight_grad: bool):
    """The backward of any `Sweeps` on the interface's inputs: G^, the sweeps, the centring's correction."""
    sweeps.need_key_weight_grad = key_weight_grad
    k_centred, valid, valid_count = centre_keys(k, key_weight, sweeps.scale, sweeps.causal)
    g_hat = torch.cat([grad_out, -(grad_out * out).sum(-1, keepdim=True)], dim=-1) / safe(denominator).unsqueeze(-1)
    # A fully masked row (D_i = 0) is the constant 0: nothing flows back from it.
    g_hat = g_hat.masked_fill((denominator == 0).unsqueeze(-1), 0.0)
    dq, dk, dv, dw = sweeps.backward(q * sweeps.root_scale, k_centred, append_ones(v), key_weight, g_hat, state)
    if not sweeps.causal:
        dk = dk - valid_mean_correction(dk, valid, valid_count)
    dw = dw if key_weight_grad else q.new_empty(0)
    return dq * sweeps.root_scale, dk * sweeps.root_scale, dv, dw


def _horner(coefficients, x):
    result = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result.mul_(x).add_(c)
    return result


def _spans(length, chunk_size):
    for start in range(0, length, chunk_size):
        yield start, min(start + chunk_size, length)


class Sweeps:
    """One call's configuration, and the chunked sweeps over (BH, rows, .) tensors.

    Batch and key/value heads are flattened into BH. Query rows are the G query heads of a key
    head stacked: head-major (G n_q) when non-causal, where any split into chunks will do, and
    position-major (n_q G) when causal, so that a chunk of C positions is C G consecutive rows.
    Features are feature-major, (BH, r, rows), in buffers reused by every chunk.
    """

    def __init__(self, q, coefficients, scale, causal, chunk_size, direct: bool = False):
        self.coefficients = tuple(coefficients)
        self.derivative = tuple(m * c for m, c in enumerate(self.coefficients))[1:] or (0.0,)
        self.table: MonomialTable = monomial_table(q.shape[-1], len(self.coefficients) - 1)
        self.phi = self.feature_map(self.table.coefficients(self.coefficients, q.dtype, q.device), q)
        self.psi = self.feature_map(None, q)
        self.scale = scale
        self.root_scale = scale**0.5
        self.causal = causal
        self.chunk_size = chunk_size
        self.need_key_weight_grad = False  # set by the backward when a float mask wants a gradient
        self.direct = Direct(self.coefficients, causal, q) if direct else None  # no state, no features
        self._masks = {}

    # ---- what an implementation built on these sweeps replaces (lrcompile.kernels.cpu) ----------

    def feature_map(self, coefficients, like):
        """phi (with coefficients) or psi (None): the torch evaluation."""
        return FeatureMap(self.table, coefficients, like)

    def whole_sweep(self, rows):
        """An object running the whole forward and backward sweep (the C one), or None: the sweeps below run."""
        return None

    def masked_polynomial(self, scores, d_block, offset, groups):
        """The in-chunk block A = P(X) * M from scores X (BH, C G, C_k), M its causal mask.

        With d_block = dL/dA (same shape), turns it into dL/dX = dL/dA * M * P'(X) in place.
        """
        mask = self.in_chunk_mask(scores.shape[1] // groups, offset, scores.shape[2], groups, scores)
        if d_block is not None:
            d_block.mul_(mask).mul_(_horner(self.derivative, scores))
        return _horner(self.coefficients, scores).mul_(mask)

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

    def forward(self, q, k, v_hat, key_weight):
        batch, heads, groups = q.shape[:3]
        rows, keys = self.query_rows(q), k.flatten(0, 1).contiguous()
        weighted = with_key_weights(v_hat, key_weight).flatten(0, 1).contiguous()  # W^ (BH, n_k, d_v + 1)
        in_c = None if self.direct is not None else self.whole_sweep(rows)
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
        out = out_hat[..., :-1] / safe(denominator).unsqueeze(-1)
        return out, denominator, state.unflatten(0, (batch, heads))

    def backward(self, q, k, v_hat, key_weight, g_hat, state):
        groups = q.shape[2]
        rows, g_rows, keys = self.query_rows(q), self.query_rows(g_hat), k.flatten(0, 1).contiguous()
        weighted = with_key_weights(v_hat, key_weight).flatten(0, 1).contiguous()
        state = state.flatten(0, 1)
        in_c = None if self.direct is not None else self.whole_sweep(rows)
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
        dv = with_key_weights(key_grads[..., :-1], key_weight)
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

    def causal_backward(self, rows, keys, weighted, g_rows, state, groups, later_query_state=None):
        """later_query_state: R of queries after the last chunk (context parallelism: the later
        ranks'), which every key here receives; None is zero."""
        n_q, n_k = rows.shape[1] // groups, keys.shape[1]
        state = self.new_state(keys, weighted.shape[-1]).copy_(state)  # all keys; peeled to S_<c
        query_state = self.new_state(rows, weighted.shape[-1])  # R_>c, grown chunk by chunk
        if later_query_state is not None:
            query_state.copy_(later_query_state)
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
        return self.masked_polynomial(torch.bmm(q_rows, k_rows.mT), d_block, offset, groups)

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


class Direct:
    """The direct algorithm for one call: the n x n block, for short sequences.

    The same function as the sweeps, computed directly, as the causal in-chunk step computes its
    block: same coefficients, centred keys k', key weights (inside W^), causal alignment and GQA
    row layout; nothing of size r is formed, so there is no state.

    Forward.   X = Q' K'^T (N, n_k);  A = P(X) * M;  O^ = A W^ (N, d_v + 1)
    Backward.  dA = G^ W^^T;  dX = dA * M * P'(X);  dq' = dX K',  dk' = dX^T Q',  U = A^T G^

    `forward` / `backward` are the core of the sweeps' interface, over the sweeps' rows (BH, N, d),
    keys (BH, n_k, d), W^ (BH, n_k, e) and G^ (BH, N, e), in torch operations: the reference, and
    the path wherever the C kernel (lrcompile.kernels.cpu.DirectKernels) does not run.
    """

    def __init__(self, coefficients, causal: bool, like: torch.Tensor):
        self.coefficients = tuple(coefficients)
        self.derivative = tuple(m * c for m, c in enumerate(self.coefficients))[1:] or (0.0,)
        self.causal = causal
        self.polynomial = torch.tensor(self.coefficients, dtype=like.dtype)  # c_0..c_g, for the C kernel

    def forward(self, rows, keys, weighted, groups):
        """O^ (BH, N, e)."""
        return torch.bmm(self.block(rows, keys, groups), weighted)

    def backward(self, rows, keys, weighted, g_rows, groups):
        """(dq' (BH, N, d), dk' (BH, n_k, d), U (BH, n_k, e))."""
        d_block = torch.bmm(g_rows, weighted.mT)  # dA, made dX by block()
        block = self.block(rows, keys, groups, d_block)
        return torch.bmm(d_block, keys), torch.bmm(d_block.mT, rows), torch.bmm(block.mT, g_rows)

    def block(self, rows, keys, groups, d_block=None):
        """A = P(X) * M for X = rows keys^T (BH, N, n_k); with d_block = dA, makes it dX in place."""
        scores = torch.bmm(rows, keys.mT)
        mask = self.mask(rows.shape[1], keys.shape[1], groups, scores) if self.causal else None
        if d_block is not None:
            d_block.mul_(_horner(self.derivative, scores))
            if mask is not None:
                d_block.mul_(mask)
        block = _horner(self.coefficients, scores)
        return block if mask is None else block.mul_(mask)

    @staticmethod
    def mask(rows, n_k, groups, like):
        """(N, n_k): 1 where row i's position i // groups (rows position-major) is at or after key j."""
        positions = torch.arange(rows, device=like.device) // groups
        return (positions[:, None] >= torch.arange(n_k, device=like.device)).to(like.dtype)
