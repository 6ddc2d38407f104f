"""lrcompile.math.flops and lrcompile.compile.cost_model: the FLOP model counts what the kernels run; calibration inverts the crossover."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lrcompile.compile import cost_model
from lrcompile.kernels import cpu
from lrcompile.math import flops
from lrcompile.ops.factored_op import factored_attention, factored_attention_backward


class MatmulFlops(TorchDispatchMode):
    """2 x multiply-adds of every (batched) matrix product run on this thread."""

    PRODUCTS = {"bmm", "baddbmm", "baddbmm_", "mm", "addmm", "addmm_"}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.PRODUCTS:
            a, b = args[-2:] if func.__name__.startswith(("baddbmm", "addmm")) else args[:2]
            self.flops += 2 * math.prod(a.shape) * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
def test_flop_model_counts_the_products_the_kernels_run(is_causal, groups, monkeypatch):
    batch, heads, n, head_dim, value_dim, chunk = 2, 2, 96, 6, 5, 32
    q = torch.randn(batch, heads, groups, n, head_dim, dtype=torch.float64)
    k = torch.randn(batch, heads, n, head_dim, dtype=torch.float64)
    v = torch.randn(batch, heads, n, value_dim, dtype=torch.float64)
    config = ([1.0, 1.0, 0.5], 0.4, is_causal, chunk)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the mode sees this thread only
    monkeypatch.setattr(cpu, "sweep", lambda *args, **kwargs: None)  # and torch's products, not C's
    monkeypatch.setenv("LRCOMPILE_ALGORITHM", "factored")  # n = 96 would be computed directly
    with MatmulFlops() as counted:
        out, denominator, state, exact = factored_attention._init_fn(q, k, v, None, *config, 0.0, "allow", "test")
        factored_attention_backward._init_fn(torch.ones_like(out), q, k, v, None, out, denominator, state, exact,
                                             *config, False)
    # GQA: the model counts per query head, with the key side shared by the group (kv_ratio)
    model = flops.lowrank_product_flops(n, n, head_dim, value_dim, batch * heads * groups, is_causal, 2, chunk,
                                       kv_ratio=1 / groups)
    assert counted.flops == pytest.approx(model, rel=1e-12)


def test_calibrated_ratio_puts_the_model_crossover_at_the_measured_one():
    for causal in (False, True):
        ratio = cost_model.ratio_for_crossover(3000, 64, 64, causal, 2, 64)
        crossover = cost_model.crossover_length(64, 64, causal, 2, 64, ratio=ratio)
        assert abs(crossover - 3000) <= 1
        assert cost_model.crossover_length(64, 64, causal, 2, 64, ratio=ratio / 2) > crossover  # slower path, later


def test_without_a_calibration_low_rank_is_never_predicted_faster():
    assert cost_model.crossover_length(64, 64, False, 2, ratio=None) is None
    assert not cost_model.lowrank_is_cheaper(10**6, 10**6, 64, 64, False, 2, ratio=None)
    assert cost_model.lowrank_is_cheaper(10**6, 10**6, 64, 64, False, 2, ratio=0.5)


def test_below_the_shortest_measured_crossover_exact_attention_is_kept():
    # FLOPs alone would favour low-rank at n = 200 for d = 16; fixed per-call costs do not
    assert cost_model.lowrank_is_cheaper(200, 200, 16, 16, False, 2, ratio=0.9)
    assert not cost_model.lowrank_is_cheaper(200, 200, 16, 16, False, 2, ratio=0.9, shortest_crossover=2000)
    assert cost_model.lowrank_is_cheaper(2000, 2000, 16, 16, False, 2, ratio=0.9, shortest_crossover=2000)
    assert cost_model.crossover_length(16, 16, False, 2, ratio=0.9, shortest_crossover=2000) == 2000


def test_byte_model_counts_the_rows_once_per_pass_and_the_states_of_the_factored_step():
    n, d, r = 4096, 64, 2145  # r = C(66, 2)
    # forward: q, k, v in, out out; backward: q, k, v, out, dout in, dq, dk, dv out: 12 n d elements
    assert flops.exact_bytes(n, n, d, d, 1, element_size=2) == 12 * n * d * 2
    extra = flops.lowrank_bytes(n, n, d, d, 3, 2, element_size=2) - flops.exact_bytes(n, n, d, d, 3, element_size=2)
    assert extra == 3 * 6 * r * (d + 1) * 4  # S forward, S and R backward, each written and read, per head
