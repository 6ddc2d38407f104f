"""The memory budget of a call's feature states: refuse, before allocating, what would not fit.

r = C(d + g, g) grows so fast with the degree that an innocent `degree=12` at d = 64 asks for
petabytes. The op (`lowrank_attention(memory_budget=...)`) and the policy
(`Policy(memory_budget=...)`) both ask `check_memory_budget`, a pure function of shapes, before
any monomial table or buffer exists; its error names the degree that would fit.
"""

from __future__ import annotations

import torch

from lrcompile.math.features import feature_dim


class MemoryBudgetError(ValueError):
    """The feature-sized states of a call would not fit its memory budget."""


# 8 GiB: what a laptop or a small GPU can give one attention call without swapping or failing,
# and a fixed number, so that the same call (and the policy's decision) is accepted or refused
# alike on every machine. r = C(d + g, g) grows so fast that the limit binds on degree, not
# sequence length: d = 64 fits degree 4 at 8 heads, not degree 6.
DEFAULT_MEMORY_BUDGET = 8 * 2**30

# The monomial table's Python index tuples (lrcompile.math.features.monomial_table), measured at
# 250-350 bytes per feature for d = 8..64, g = 2..8.
_TABLE_BYTES_PER_FEATURE = 400


def state_bytes(head_dim: int, value_dim: int, degree: int, batch_heads: int, chunk_size: int,
                dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the feature-sized tensors one call (forward and backward) holds at once.

    Per key/value head (batch_heads of them): the states S and R and, causally, the copy of S the
    backward peels, each r x (d_v + 1); three chunk buffers of features, r x chunk_size; and once
    per call the monomial table. r = C(d + g, g). Pure arithmetic on shapes: nothing is allocated.
    """
    r = feature_dim(head_dim, degree)
    element = torch.empty((), dtype=dtype).element_size()
    return element * batch_heads * r * (3 * (value_dim + 1) + 3 * chunk_size) + _TABLE_BYTES_PER_FEATURE * r


def check_memory_budget(head_dim: int, value_dim: int, degree: int, batch_heads: int, chunk_size: int,
                        dtype: torch.dtype = torch.float32, budget: int | None = None) -> int:
    """state_bytes(...) if it fits `budget` (None: DEFAULT_MEMORY_BUDGET), else MemoryBudgetError
    naming r, the bytes needed, the budget and the largest degree that would fit."""
    budget = DEFAULT_MEMORY_BUDGET if budget is None else budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {budget!r}")
    needed = state_bytes(head_dim, value_dim, degree, batch_heads, chunk_size, dtype)
    if needed <= budget:
        return needed
    fitting = [g for g in range(1, degree)
               if state_bytes(head_dim, value_dim, g, batch_heads, chunk_size, dtype) <= budget]
    largest = f"the largest degree that fits is {fitting[-1]}" if fitting else "no degree fits"
    raise MemoryBudgetError(
        f"degree {degree} at head_dim {head_dim} has r = C({head_dim}+{degree}, {degree}) = "
        f"{feature_dim(head_dim, degree):,} features: its states for {batch_heads} key/value heads "
        f"(value_dim {value_dim}, chunk_size {chunk_size}, {dtype}) need {_gib(needed)}, over the "
        f"memory budget of {_gib(budget)}; {largest} (or raise memory_budget=)"
    )


def _gib(n: float) -> str:
    return f"{n:,.0f} bytes ({n / 2**30:.3g} GiB)"
