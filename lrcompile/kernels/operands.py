"""The operands every kernel implementation builds the same way, and the corrections after it.

With q' = sqrt(s) q, k' = sqrt(s) k - mu (mu the mean of the valid keys when non-causal, 0 when
causal), V^ = [V | 1] and W^ = w * V^, each implementation (reference, cpu, triton) computes

    A_ij = w_j P(q'_i . k'_j) [j <= i if causal],    out_i = sum_j A_ij v_j / D_i,   D_i = sum_j A_ij

and, backward, G^_i = [dO_i | -(dO_i . out_i)] / D_i; the centring adds the correction
dk'_j -> dk'_j - [j valid] sum_l dk'_l / n_valid. These are the pieces here: they live below the
implementations so that none of them owns what the others use (lrcompile.kernels.interface).
"""

from __future__ import annotations

import torch


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


def valid_mean_correction(dk_centred, valid, valid_count):
    """What the centring subtracts from dk' (mu depends on every valid key)."""
    if valid is None:
        return dk_centred.mean(-2, keepdim=True)
    return valid * dk_centred.sum(-2, keepdim=True) / valid_count


def safe(denominator):
    """D with its zeros (rows with no key to attend to) replaced by 1, to divide by."""
    return denominator.masked_fill(denominator == 0, 1.0)


def append_ones(v):
    """V^ = [V | 1]: the last column sums the weights, D."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def with_key_weights(rows, key_weight):
    """Rows (B, H, n_k, e) times their key weights (B, H, n_k)."""
    return rows if key_weight is None else rows * key_weight.unsqueeze(-1)
