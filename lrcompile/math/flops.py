"""FLOP model of exact and low-rank attention, forward + backward, and the crossover between them.

Counts are multiply-adds x 2 for the matrix products, per attention call (all batch entries and
query heads), for one forward and one backward: the work a training step does. Elementwise work
is left out of the exact count (it is O(n^2), dominated by the products) but kept for the
low-rank feature maps, whose elementwise work is O(n r) like its products.

Predicted time is FLOPs / rate. The low-rank path runs at a fraction of exact attention's rate
(smaller products, the feature maps, per-chunk overheads): that fraction is the calibration, so
the crossover compares predicted times, not FLOPs. It is measured, not assumed, per machine and
kernel implementation (`lrcompile calibrate`; lrcompile.calibration stores them and says which
applies): the fraction that puts the model's crossover where the measured one is. FLOPs miss the
fixed cost of a call, which decides at short lengths (a millisecond against SDPA's few
microseconds at n = 128): below the shortest crossover measured, the model keeps exact attention
whatever the FLOPs say. Without a calibration (ratio None) low-rank is never predicted cheaper.
"""

from __future__ import annotations

import functools

from lrcompile.features import feature_dim


def exact_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool):
    """QK^T and AV forward; dQ, dK, dV, dA backward (and the recomputed QK^T of flash kernels)."""
    forward = 2 * n_q * n_k * (head_dim + value_dim)
    total = forward * 3.5  # backward: 2x the forward, plus the recomputed scores
    return total * batch_heads * (0.5 if causal else 1.0)


def lowrank_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal: bool, degree: int, chunk: int = 256,
                  kv_ratio: float = 1.0):
    """The factored forward and backward of `lrcompile.factored`: its matrix products, plus the
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
    """The direct algorithm of `lrcompile.direct` (the n x n polynomial block, no features), forward
    and backward: per visible (query, key) pair X and A W^ forward; X, dA, dq, dk and U backward."""
    if causal:  # query position i sees keys 0..min(i, n_k - 1)
        seen = min(n_q, n_k)
        pairs = seen * (seen + 1) // 2 + (n_q - seen) * n_k
    else:
        pairs = n_q * n_k
    return pairs * 2 * (4 * head_dim + 3 * (value_dim + 1)) * batch_heads


def lowrank_is_cheaper(n_q, n_k, head_dim, value_dim, causal, degree, chunk=256, kv_ratio=1.0, *,
                       ratio: float | None, shortest_crossover: int = 0) -> bool:
    """Predicted time of the low-rank path below exact attention's, with the calibration's rate
    `ratio` (None: not calibrated, never) and no rewrite below its `shortest_crossover`."""
    if ratio is None or n_k < shortest_crossover:
        return False
    exact = exact_flops(n_q, n_k, head_dim, value_dim, 1, causal)
    lowrank = lowrank_flops(n_q, n_k, head_dim, value_dim, 1, causal, degree, chunk, kv_ratio)
    return lowrank / ratio < exact


def crossover_length(head_dim, value_dim, causal, degree, chunk=256, *, ratio: float | None,
                     shortest_crossover: int = 0) -> int | None:
    """Smallest n (n_q = n_k) from which low-rank is predicted faster (bisection); None if never."""
    if ratio is None:
        return None
    cheaper = functools.partial(lowrank_is_cheaper, head_dim=head_dim, value_dim=value_dim, causal=causal,
                                degree=degree, chunk=chunk, ratio=ratio, shortest_crossover=shortest_crossover)
    low, high = 1, 1
    while not cheaper(high, high):
        high *= 2
        if high > 1 << 30:
            return None
    while low < high:
        mid = (low + high) // 2
        if cheaper(mid, mid):
            high = mid
        else:
            low = mid + 1
    return low


def ratio_for_crossover(n, head_dim, value_dim, causal, degree, chunk=256) -> float:
    """The rate ratio at which the model's crossover is n: exact and low-rank FLOPs / ratio equal."""
    return (lowrank_flops(n, n, head_dim, value_dim, 1, causal, degree, chunk)
            / exact_flops(n, n, head_dim, value_dim, 1, causal))


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
