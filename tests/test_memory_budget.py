"""The memory budget of the feature states: a pure function of shapes, checked before allocating."""

import pytest
import torch

from conftest import attention_inputs
from lrcompile import lowrank_attention
from lrcompile.kernels import reference
from lrcompile.math.features import feature_dim
from lrcompile.math.memory_budget import DEFAULT_MEMORY_BUDGET, MemoryBudgetError, check_memory_budget, state_bytes


def test_degree_whose_states_exceed_the_memory_budget_is_refused_before_allocating(monkeypatch):
    def no_table(*args):
        raise AssertionError("the monomial table was built before the budget check")

    monkeypatch.setattr(reference, "monomial_table", no_table)
    q, k, v = (torch.randn(1, 2, 16, 64) for _ in range(3))
    with pytest.raises(MemoryBudgetError, match=r"degree 12 at head_dim 64 has r = C\(64\+12, 12\)") as error:
        lowrank_attention(q, k, v, degree=12)
    message = str(error.value)
    assert f"{DEFAULT_MEMORY_BUDGET:,} bytes" in message and "the largest degree that fits is 4" in message


def test_memory_budget_is_a_pure_function_of_shapes_and_a_keyword():
    r = feature_dim(8, 2)  # 45
    # float32: 2 heads x 45 features x (3 (d_v + 1) + 3 chunk) + the table
    assert state_bytes(8, 8, 2, 2, 16, torch.float32) == 4 * 2 * r * (3 * 9 + 3 * 16) + 400 * r
    needed = check_memory_budget(8, 8, 2, 2, 16, torch.float32, budget=10**6)
    assert needed == state_bytes(8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(MemoryBudgetError, match="no degree fits"):
        check_memory_budget(8, 8, 2, 2, 16, torch.float32, budget=1000)
    q, k, v = attention_inputs(1, 2, 16, 16, 8, requires_grad=False)
    with pytest.raises(MemoryBudgetError, match="the largest degree that fits is 1"):
        lowrank_attention(q, k, v, degree=3, bound=1.0, memory_budget=state_bytes(8, 8, 1, 2, 16, torch.float64))
    lowrank_attention(q, k, v, degree=2, memory_budget=state_bytes(8, 8, 2, 2, 16, torch.float64))
