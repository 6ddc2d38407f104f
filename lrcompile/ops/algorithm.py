"""Direct or factored: which algorithm of the polynomial attention a call runs.

The kernels (lrcompile.kernels.reference and the implementations beside it) compute, per
(batch, key/value head),

    A_ij = w_j P(q'_i . k'_j) [j <= i if causal],    out_i = sum_j A_ij v_j / D_i,   D_i = sum_j A_ij

through features, P(q'.k') = phi(q') . psi(k'), in O(n r d_v). With n at or below a few chunks the
r-wide products cost more than the n x n block itself (r = 2145 at d = 64, degree 2), so there the
same function is computed directly, as the causal in-chunk step already computes its block: same
coefficients, same centred keys k', same key weights (inside W^ = w * [V | 1]), same causal
alignment and GQA row layout. Two algorithms of one function: the op (lrcompile.ops.factored_op)
picks the cheaper (`uses_direct`), forward and backward alike, and asks the kernels for it. The
torch version (`lrcompile.kernels.reference.Direct`) is a core with the sweeps' interface, and
everything around it (centring, W^, G^, dV, dw, the centring correction) is the sweeps'; the C
kernel (lrcompile.kernels.cpu.DirectKernels) does that work inside its one pass. The guard is the
op's either way.

Forward.   X = Q' K'^T (N, n_k);  A = P(X) * M;  O^ = A W^ (N, d_v + 1)
Backward.  With G^ as in lrcompile.kernels.reference (dO / D and the delta column):
           dA_ij = G^_i . W^_j, so dA = G^ W^^T;  dX = dA * M * P'(X)
           dq' = dX K',   dk' = dX^T Q',   U = A^T G^   (U_j = sum_i A_ij G^_i / w_j, as the sweeps'
           U_j = R^T psi(k'_j): dV_j = w_j U_j[:d_v], dw_j = U_j . V^_j follow unchanged)

M is the causal mask of the sweeps' position-major rows (row i is position i // G and sees keys
0..i // G, top-left aligned as SDPA), all ones otherwise. Nothing of size r is formed, so there
is no state: the op's state output has 0 rows when this algorithm runs.

On the CPU the C kernel (csrc/direct.h, lrcompile.kernels.cpu.DirectKernels) runs one head per thread,
in tiles of query positions; the torch version (reference.Direct) is what it is tested against, and
runs where the C kernel does not (fewer heads than threads, no compiler, another device when
forced).

Which algorithm: predicted time = FLOPs / rate. `lrcompile.math.flops.direct_flops` counts the direct
products, `flops.lowrank_flops` the factored ones; the direct algorithm runs at DIRECT_RATE_RATIO
times the factored rate on the CPU (measured by benchmarks/short_sequences.py --calibrate), so it
is chosen iff direct_flops < DIRECT_RATE_RATIO * lowrank_flops; on device types without a measured
ratio the factored algorithm runs. The rule is a function of the
shapes alone, so forward and backward choose alike. LRCOMPILE_ALGORITHM=direct|factored forces one
(benchmarks, tests); it must not change between a forward and its backward, nor between compiling
a model and running it (the compiled graph's state output has the shape the algorithm chosen at
compile time gives, and Inductor checks it).
"""

from __future__ import annotations

import contextlib
import os

from lrcompile.math import flops

# Direct FLOP rate / factored FLOP rate, per device type, both with lrcompile's own kernels on the
# same BLAS. Measured by benchmarks/short_sequences.py --calibrate (benchmarks/RESULTS.md, "direct
# calibration"; 2-core CPU, degree 2, float32): 7.0 (d = 32) and 1.75 (d = 64) non-causal, 2.8
# (d = 32) and 1.27 (d = 64) causal. The spread is the factored FLOP count's: its narrow r = 561
# products at d = 32 run far below the rate of the r = 2145 ones at d = 64. 2.5, their geometric
# mean, switches at n = 1261 / 4709 (d = 32 / 64) non-causal and 4128 / 11282 causal, against
# measured crossovers of 3519 / 3293 and 4585 / 5727: within 2.8x in time of the faster algorithm
# at the switch, and direct wherever n <= 1261. A device type not listed keeps the factored
# algorithm (unless forced): the torch version there forms (BH, N, n_k) blocks, and nothing says
# where its crossover is.
DIRECT_RATE_RATIO = {"cpu": 2.5}
ALGORITHMS = ("auto", "direct", "factored")


def forced_algorithm() -> str:
    """LRCOMPILE_ALGORITHM: "auto" (the cost rule), or "direct" / "factored" everywhere."""
    value = os.environ.get("LRCOMPILE_ALGORITHM", "auto").strip().lower() or "auto"
    if value not in ALGORITHMS:
        raise ValueError(f"LRCOMPILE_ALGORITHM must be one of {ALGORITHMS}, got {value!r}")
    return value


@contextlib.contextmanager
def algorithm_forced(algorithm: str):
    """LRCOMPILE_ALGORITHM=algorithm for the duration (read at every call). The cost model's
    calibration measures the factored algorithm, whose FLOPs it models, under this."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    saved = os.environ.get("LRCOMPILE_ALGORITHM")
    os.environ["LRCOMPILE_ALGORITHM"] = algorithm
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LRCOMPILE_ALGORITHM", None)
        else:
            os.environ["LRCOMPILE_ALGORITHM"] = saved


def uses_direct(n_q: int, n_k: int, head_dim: int, value_dim: int, groups: int, degree: int, causal: bool,
                chunk: int, device_type: str) -> bool:
    """Whether the op computes this call directly: the cost rule of the module docstring."""
    forced = forced_algorithm()
    if forced != "auto":
        return forced == "direct"
    return _direct_is_cheaper(n_q, n_k, head_dim, value_dim, groups, degree, causal, chunk, device_type)


def _direct_is_cheaper(n_q, n_k, head_dim, value_dim, groups, degree, causal, chunk, device_type):
    ratio = DIRECT_RATE_RATIO.get(device_type)
    if ratio is None:  # not measured there: the factored algorithm, as before the direct one existed
        return False
    direct = flops.direct_flops(n_q, n_k, head_dim, value_dim, groups, causal)
    factored = flops.lowrank_flops(n_q, n_k, head_dim, value_dim, groups, causal, degree, chunk, 1 / groups)
    return direct < ratio * factored


def crossover_length(head_dim: int, value_dim: int, causal: bool, degree: int, chunk: int, groups: int = 1,
                     device_type: str = "cpu") -> int:
    """Smallest n (n_q = n_k) from which the cost rule chooses the factored algorithm."""
    def factored(n):
        return not _direct_is_cheaper(n, n, head_dim, value_dim, groups, degree, causal, chunk, device_type)
    if device_type not in DIRECT_RATE_RATIO:
        return 1
    high = 1
    while not factored(high):
        high *= 2
    low = high // 2 + 1 if high > 1 else 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if factored(middle) else (middle + 1, high)
    return low
