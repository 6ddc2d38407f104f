"""Every op's fake (meta) kernel gives exactly the sizes and strides of its real kernel, for every
layout the rewrite hands it: GQA's grouped 5-D query layout viewed from a (B, n, H, d) projection
(not contiguous), cross-attention (n_q != n_k), key weights or none, float32/bfloat16/float16/
float64. Under torch.compile Inductor asserts the fake kernel's strides on the real outputs
(`assert_size_stride`), so a mismatch fails a compiled model only where that layout occurs.

torch.library.opcheck runs each op for real and under FakeTensorMode and compares them, and checks
the schema and the autograd registration. The Triton ops get the same check under the interpreter
in tests/test_triton_kernels.py.
"""

import pytest
import torch

from lrcompile.ops import factored_op as factored, guard

TAYLOR_2 = [1.0, 1.0, 0.5]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _projected(batch, n, heads, width, dtype, generator):
    """(B, heads, n, width) as attention receives it from a projection: a transposed (B, n, heads, width) view."""
    return (torch.randn(batch, n, heads, width, generator=generator) / width**0.5).to(dtype).transpose(1, 2)


LAYOUTS = {  # (n_q, n_k, kv_heads, groups, key weights)
    "gqa": (9, 9, 2, 2, False),
    "gqa_key_padding": (9, 9, 1, 3, True),
    "cross": (5, 11, 2, 1, True),
}


def _inputs(layout, dtype, seed=0):
    """q (B, H, G, n_q, d) grouped from a transposed projection, k, v (B, H, n_k, .) transposed, key weights or None."""
    n_q, n_k, kv_heads, groups, weighted = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    q = _projected(2, n_q, kv_heads * groups, 4, dtype, generator).unflatten(1, (kv_heads, groups))
    k, v = _projected(2, n_k, kv_heads, 4, dtype, generator), _projected(2, n_k, kv_heads, 3, dtype, generator)
    key_weight = None
    if weighted:
        key_weight = (0.5 + torch.rand(2, kv_heads, n_k, generator=generator)).to(dtype)
        key_weight[..., -2:] = 0
    assert not q.is_contiguous()
    return q, k, v, key_weight


def _output_like(q, value_dim, dtype, generator):
    """(B, H, G, n_q, d_v) in the strides a head-merging model gives it: a permuted (B, n_q, H, G, d_v)."""
    batch, heads, groups, n_q, _ = q.shape
    return torch.randn(batch, n_q, heads, groups, value_dim, generator=generator).to(dtype).permute(0, 2, 3, 1, 4)


@pytest.mark.parametrize("fall_back", [False, True], ids=["kept", "exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_guarded_output_and_its_backward_pass_opcheck_in_every_layout(layout, dtype, fall_back):
    q, k, v, key_weight = _inputs(layout, dtype, seed=1)
    generator = torch.Generator().manual_seed(2)
    out = _output_like(q, v.shape[-1], dtype, generator)
    max_error = -1.0 if fall_back else 1e9
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (out, q, k, v, key_weight)]
    torch.library.opcheck(guard.guarded_output, (*leaves, 0.5, False, max(max_error, 0.0), "exact", "test:layouts"))
    exact = torch.tensor(fall_back)
    grad = _output_like(q, v.shape[-1], dtype, generator)
    for key_weight_grad in ([False, True] if key_weight is not None else [False]):
        torch.library.opcheck(guard.guarded_output_backward,
                              (grad, q, k, v, key_weight, exact, 0.5, False, key_weight_grad))


@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_factored_attention_and_its_backward_pass_opcheck_in_every_layout(layout, dtype, causal):
    q, k, v, key_weight = _inputs(layout, dtype, seed=3)
    out, denominator, state, exact = factored.factored_attention(
        q, k, v, key_weight, TAYLOR_2, 0.5, causal, 4, 0.0, "allow", "test:layouts", "torch")
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, key_weight)]
    torch.library.opcheck(factored.factored_attention,
                          (*leaves, TAYLOR_2, 0.5, causal, 4, 0.0, "allow", "test:layouts", "torch"))
    grad = _output_like(q, v.shape[-1], dtype, torch.Generator().manual_seed(4))
    torch.library.opcheck(factored.factored_attention_backward,
                          (grad, q, k, v, key_weight, out, denominator, state, exact, TAYLOR_2, 0.5, causal, 4,
                           key_weight is not None, "torch"))


@pytest.mark.parametrize("algorithm", ["factored", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["gqa_key_padding", "cross"])
def test_the_ops_pass_opcheck_with_a_causal_bias_log_weights_and_a_fixed_algorithm(layout, dtype, algorithm):
    # the arguments the guard's backward check and a causal float mask add: log_key_weight (with a
    # removed key, -inf), the polynomial's coefficients for the gradient check, a fixed algorithm
    q, k, v, key_weight = _inputs(layout, dtype, seed=5)
    log_key_weight = torch.where(key_weight > 0, key_weight.log(), float("-inf"))
    settings = (TAYLOR_2, 0.5, True, 4, 1e9, "exact", "test:layouts", "torch")
    out, denominator, state, exact = factored.factored_attention(q, k, v, key_weight, *settings, log_key_weight,
                                                                 algorithm)
    assert state.shape[-2] == (0 if algorithm == "direct" else 15)  # C(4 + 2, 2) features
    leaves = [t.detach().requires_grad_() for t in (q, k, v, key_weight, log_key_weight)]
    torch.library.opcheck(factored.factored_attention, (*leaves[:4], *settings, leaves[4], algorithm))
    grad = _output_like(q, v.shape[-1], dtype, torch.Generator().manual_seed(6))
    torch.library.opcheck(factored.factored_attention_backward,
                          (grad, q, k, v, key_weight, out, denominator, state, exact, TAYLOR_2, 0.5, True, 4, True,
                           "torch", log_key_weight, 1e9, "exact", "test:layouts", algorithm))
    guard_out = _output_like(q, v.shape[-1], dtype, torch.Generator().manual_seed(7))
    torch.library.opcheck(guard.guarded_output, (guard_out.detach().requires_grad_(), *leaves[:4], 0.5, True, 1e9,
                                                 "exact", "test:layouts", TAYLOR_2, leaves[4]))
    torch.library.opcheck(guard.guarded_output_backward,
                          (grad, q, k, v, key_weight, torch.tensor(False), 0.5, True, True, TAYLOR_2, 1e9, "exact",
                           "test:layouts", log_key_weight))
