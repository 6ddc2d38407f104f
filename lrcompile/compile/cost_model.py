"""The cost model: predicted times of exact and low-rank attention, and the crossover between them.

Predicted time is FLOPs (lrcompile.math.flops) / rate. The low-rank path runs at a fraction of
exact attention's rate (smaller products, the feature maps, per-chunk overheads): that fraction is
the calibration, so the crossover compares predicted times, not FLOPs. It is measured, not
assumed, per machine and kernel implementation (`lrcompile calibrate`; lrcompile.compile.calibration
stores them and says which applies): the fraction that puts the model's crossover where the
measured one is. FLOPs miss the fixed cost of a call, which decides at short lengths (a
millisecond against SDPA's few microseconds at n = 128): below the shortest crossover measured,
the model keeps exact attention whatever the FLOPs say. Without a calibration (ratio None)
low-rank is never predicted cheaper.
"""

from __future__ import annotations

import functools

from lrcompile.math.flops import exact_flops, lowrank_flops


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
