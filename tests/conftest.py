"""Shared fixtures: fresh random attention inputs with a stated score range."""

import math

import pytest
import torch


def attention_inputs(
    batch=2, heads=3, n_q=37, n_k=37, head_dim=8, value_dim=None, *, score_range=1.0,
    kv_heads=None, dtype=torch.float64, seed=None, requires_grad=True,
):
    """q, k, v whose centred scores |s q_i . (k_j - mu)| stay within `score_range` (s = 1/sqrt(d)).

    Rows of q have norm a and rows of k norm a, so |s q . (k - mu)| <= s a * 2a = score_range.
    The seed is fresh per call unless given, so every run draws new inputs.
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    kv_heads = heads if kv_heads is None else kv_heads
    value_dim = head_dim if value_dim is None else value_dim
    norm = math.sqrt(score_range * math.sqrt(head_dim) / 2)

    def rows(*shape):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return x / x.norm(dim=-1, keepdim=True) * norm

    q = rows(batch, heads, n_q, head_dim)
    k = rows(batch, kv_heads, n_k, head_dim)
    v = torch.randn(batch, kv_heads, n_k, value_dim, generator=generator, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
