"""FLOP model of exact and low-rank attention, forward + backward, and the crossover between them.

Counts are multiply-adds x 2 for the matrix products, per attention call (all batch entries and
query heads), for one forward and one backward: the work a training step does. Elementwise work
is left out of the exact count (it is O(n^2), dominated by the products) but kept for the
low-rank feature maps, whose elementwise work is O(n r) like its products.

`LOWRANK_RATE_RATIO` (non-causal) and `CAUSAL_LOWRANK_RATE_RATIO` are the ratios (low-rank
path's achieved FLOP rate) / (SDPA's) near the crossover, so the crossover compares predicted
times, not FLOPs. Calibrated by benchmarks/op_speed.py on the 2-core CPU of RESULTS.md (d = 64,
degree 2, forward + backward): measured crossovers n = 3955-4031 non-causal (model: 3812) and
n = 12611-14309 causal (model with 0.36: about 13500). Causal is lower because SDPA skips the
masked half of the work while the in-chunk blocks and the backward's rebuilt state add to ours.
"""

from __future__ import annotations

from lrcompile.features import feature_dim

LOWRANK_RATE_RATIO = 0.5
CAUSAL_LOWRANK_RATE_RATIO = 0.36


def exact_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool):
    """QK^T and AV forward; dQ, dK, dV, dA backward (and the recomputed QK^T of flash kernels)."""
    forward = 2 * n_q * n_k * (head_dim + value_dim)
    total = forward * 3.5  # backward: 2x the forward, plus the recomputed scores
    return total * batch_heads * (0.5 if causal else 1.0)


def lowrank_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool, degree: int, chunk: int = 256,
                  kv_ratio: float = 1.0):
    """Feature products of the factored forward and backward (see lrcompile.factored).

    kv_ratio = key/value heads / query heads (GQA shares each key state among its query heads).
    """
    r = feature_dim(head_dim, degree)
    columns = value_dim + 1
    elementwise = 8 * r  # building the features twice (forward, backward) and their VJP, per row
    query_side = n_q * (2 * r * columns * 3 + elementwise)  # phi S; R += phi^T G; G S^T
    key_side = n_k * kv_ratio * (2 * r * columns * 3 + elementwise)  # S; dV; d psi
    total = query_side + key_side
    if causal:
        block = min(chunk, n_q)
        total += n_q * block * (head_dim + columns) * 2 * 3  # in-chunk blocks, forward and backward
        total += n_k * kv_ratio * 2 * r * columns + n_q * r  # the state rebuilt in the backward
    return total * batch_heads


def lowrank_is_cheaper(n_q, n_k, head_dim, value_dim, causal, degree, chunk=256, kv_ratio=1.0) -> bool:
    exact = exact_flops(n_q, n_k, head_dim, value_dim, 1, causal)
    lowrank = lowrank_flops(n_q, n_k, head_dim, value_dim, 1, causal, degree, chunk, kv_ratio)
    return lowrank / rate_ratio(causal) < exact


def rate_ratio(causal: bool) -> float:
    return CAUSAL_LOWRANK_RATE_RATIO if causal else LOWRANK_RATE_RATIO


def crossover_length(head_dim, value_dim, causal, degree, chunk=256) -> int:
    """Smallest n (n_q = n_k) from which low-rank is predicted faster; found by bisection."""
    low, high = 1, 1
    while not lowrank_is_cheaper(high, high, head_dim, value_dim, causal, degree, chunk):
        high *= 2
        if high > 1 << 30:
            return high
    while low < high:
        mid = (low + high) // 2
        if lowrank_is_cheaper(mid, mid, head_dim, value_dim, causal, degree, chunk):
            high = mid
        else:
            low = mid + 1
    return low
