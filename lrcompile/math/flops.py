"""FLOP and byte counts of exact and low-rank attention, forward + backward.

Counts are multiply-adds x 2 for the matrix products, per attention call (all batch entries and
query heads), for one forward and one backward: the work a training step does. Elementwise work
is left out of the exact count (it is O(n^2), dominated by the products) but kept for the
low-rank feature maps, whose elementwise work is O(n r) like its products. The byte counts are
the least memory traffic of a step. What the counts predict (times, the crossover) is the cost
model's (lrcompile.compile.cost_model); which algorithm a call runs is lrcompile.ops.algorithm's.
"""
from __future__ import annotations

from lrcompile.math.features import feature_dim


def exact_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool):
    """QK^T and AV forward; dQ, dK, dV, dA backward (and the recomputed QK^T of flash kernels)."""
    forward = 2 * n_q * n_k * (head_dim + value_dim)
    total = forward * 3.5  # backward: 2x the forward, plus the recomputed scores
    return total * batch_heads * (0.5 if causal else 1.0)


def lowrank_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool, degree: int, chunk: int = 256,
                  kv_ratio: float = 1.0):
    """The factored forward and backward of the sweeps (lrcompile.kernels.reference): its matrix products, plus the
    feature maps, built twice per row (forward, backward) with r multiplications each and
    differentiated once with two multiply-adds per feature.

    kv_ratio = key/value heads / query heads (GQA shares each key state among its query heads).
    """
    r = feature_dim(head_dim, degree)
    feature_maps = (n_q + n_k * kv_ratio) * (2 * r + 4 * r) * batch_heads
    return lowrank_product_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal, degree, chunk, kv_ratio) + feature_maps


def lowrank_product_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool, degree: int, chunk: int = 256,
                          kv_ratio: float = 1.0):
    """The matrix products alone. With the (r, d_v + 1) states: phi S, R += phi^T G^, dphi = S G^
    per query row; S += psi^T W^, U = psi R, dpsi = R W^ per key row, and causally the backward's
    S -= psi^T W^ (the state peeled back chunk by chunk). Causal in-chunk blocks (chunk x chunk
    per query row): X = q k^T and A W^ forward; X, dA, dq, dk and dW^ backward."""
    r = feature_dim(head_dim, degree)
    columns = value_dim + 1
    key_products = 4 if causal else 3
    total = n_q * 3 * 2 * r * columns + n_k * kv_ratio * key_products * 2 * r * columns
    if causal:
        block = min(chunk, n_k)
        total += n_q * block * 2 * (4 * head_dim + 3 * columns)
    return total * batch_heads


def direct_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool):
    """The direct algorithm (lrcompile.ops.algorithm; the n x n polynomial block, no features), forward
    and backward: per visible (query, key) pair X and A W^ forward; X, dA, dq, dk and U backward."""
    if causal:  # query position i sees keys 0..min(i, n_k - 1)
        seen = min(n_q, n_k)
        pairs = seen * (seen + 1) // 2 + (n_q - seen) * n_k
    else:
        pairs = n_q * n_k
    return pairs * 2 * (4 * head_dim + 3 * (value_dim + 1)) * batch_heads


def exact_bytes(n_q, n_k, head_dim, value_dim, batch_heads, element_size: int) -> float:
    """Least memory traffic of a fused (flash) exact attention step, forward + backward: q, k, v read
    and the output written forward; q, k, v, the output and its gradient read and dq, dk, dv written
    backward. The scores never reach memory in a fused kernel, so this is O(n d)."""
    forward = n_q * head_dim + n_k * (head_dim + value_dim) + n_q * value_dim
    backward = 2 * n_q * head_dim + 2 * n_k * (head_dim + value_dim) + 2 * n_q * value_dim
    return (forward + backward) * element_size * batch_heads


def lowrank_bytes(n_q, n_k, head_dim, value_dim, batch_heads, degree: int, element_size: int) -> float:
    """Least memory traffic of the factored step: exact_bytes's O(n d) rows, plus the float32 states
    (r, d_v + 1) written and read once each: S forward, S and R backward. Kernels that keep a running
    state on chip move no more; each hand-over of a state through memory adds 2 r (d_v + 1) 4 bytes."""
    state = feature_dim(head_dim, degree) * (value_dim + 1) * 4
    return exact_bytes(n_q, n_k, head_dim, value_dim, batch_heads, element_size) + 2 * 3 * state * batch_heads
