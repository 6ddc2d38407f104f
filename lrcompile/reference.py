"""Quadratic float64 references: exact softmax attention and the polynomial attention it approximates.

Both materialise the n_q x n_k weight matrix on purpose. They are written independently of the
factored kernels so that tests can tell a kernel bug (factored vs. quadratic polynomial: equal to
rounding) from approximation error (quadratic polynomial vs. exact softmax).
"""

from __future__ import annotations

import math

import torch


def exact_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """softmax(s q k^T + mask) v in float64, with SDPA's semantics (a key-padding mask may
    accompany is_causal)."""
    q, k, v, scale = _prepare(q, k, v, scale, enable_gqa)
    scores = scale * q @ k.mT
    if attn_mask is not None:
        scores = scores + _additive(attn_mask)
    if is_causal:
        scores = scores.masked_fill(~_causal(q, k), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def polynomial_attention(q, k, v, coefficients, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The function lowrank_attention computes, evaluated quadratically in float64:

        A_ij = w_j P(s q_i . k_j - sqrt(s) q_i . mu) [j <= i if causal],  out = A v / A 1

    with w_j = exp(mask_j) and mu the mean of the keys with w_j > 0 (non-causal) or 0 (causal).
    """
    q, k, v, scale = _prepare(q, k, v, scale, enable_gqa)
    weight = torch.ones(k.shape[:-1], dtype=torch.float64).unsqueeze(-2)  # (..., 1, n_k)
    if attn_mask is not None:
        weight = torch.exp(_additive(attn_mask)).expand(*q.shape[:-2], -1, -1)[..., :1, :]
    valid = (weight > 0).to(torch.float64).mT  # (..., n_k, 1)
    mu = 0 if is_causal else (valid * k).sum(-2, keepdim=True) / valid.sum(-2, keepdim=True).clamp_min(1)
    x = scale * q @ (k - mu).mT
    p = sum(c * x**m for m, c in enumerate(coefficients)) * weight
    if is_causal:
        p = p * _causal(q, k)
    return (p @ v) / p.sum(-1, keepdim=True)


def _prepare(q, k, v, scale, enable_gqa):
    q, k, v = (t.detach().to(torch.float64) if not t.requires_grad else t.to(torch.float64) for t in (q, k, v))
    if enable_gqa:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    return q, k, v, (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def _additive(mask):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    return mask.to(torch.float64)


def _causal(q, k):
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()


def random_attention_inputs(
    batch=2, heads=3, n_q=37, n_k=37, head_dim=8, value_dim=None, *, score_range=1.0, attained=False,
    kv_heads=None, dtype=torch.float64, seed=None, requires_grad=True,
):
    """Fresh random q, k, v whose scores |s q_i . (k_j - mu)| stay within `score_range`.

    s = 1/sqrt(d), mu the mean key. Rows of q and k have equal norms a with s a (2a) = score_range,
    so the range is a rigorous bound. With attained=True, q is rescaled so that the largest
    centred score equals score_range exactly, so tables labelled with a range really reach it.
    A seed of None draws a fresh one on every call.
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    kv_heads = heads if kv_heads is None else kv_heads
    value_dim = head_dim if value_dim is None else value_dim
    scale = 1 / math.sqrt(head_dim)
    norm = math.sqrt(score_range / (2 * scale))

    def rows(*shape):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return x / x.norm(dim=-1, keepdim=True) * norm

    q = rows(batch, heads, n_q, head_dim)
    k = rows(batch, kv_heads, n_k, head_dim)
    v = torch.randn(batch, kv_heads, n_k, value_dim, generator=generator, dtype=torch.float64)
    if attained:
        groups = heads // kv_heads
        k_centred = (k - k.mean(-2, keepdim=True)).repeat_interleave(groups, dim=-3)
        q = q * (score_range / (scale * q @ k_centred.mT).abs().amax())
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))
