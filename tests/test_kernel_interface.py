"""The kernel interface (lrcompile.kernels.interface): every implementation the selector hands out
computes, through the same `forward` and `backward`, the polynomial attention of the float64
quadratic reference (lrcompile.reference), values and gradients, both algorithms, to rounding.

Inputs are in the kernel layout, float64, scores within |x| <= 2, positive key weights. Triton
runs only under TRITON_INTERPRET=1 in a fresh process: tests/test_kernels.py holds it to the same
reference through the op front, which reaches it through this interface.
"""

import pytest
import torch

from lrcompile.kernels import selector
from lrcompile.kernels.interface import KernelConfig
from lrcompile.math.features import feature_dim
from lrcompile.reference import polynomial_attention, random_attention_inputs

TAYLOR_3 = (1.0, 1.0, 0.5, 1 / 6)
SCALE = 0.5


@pytest.fixture(params=["torch", "c"])
def implementation(request):
    if selector.why_not(request.param, "cpu", torch.float64, 3, 8, 8):
        pytest.skip(selector.why_not(request.param, "cpu", torch.float64, 3, 8, 8))
    return request.param


@pytest.mark.parametrize("direct", [False, True], ids=["factored", "direct"])
@pytest.mark.parametrize("causal", [False, True], ids=["non_causal", "causal"])
def test_each_implementation_computes_the_reference_forward_and_backward(implementation, direct, causal):
    torch.manual_seed(0)
    q, k, v = random_attention_inputs(2, 2, 37, 37, 8, score_range=2.0, dtype=torch.float64)  # (B, H, n, d)
    q, k, v = (t.detach() for t in (q, k, v))
    weight = torch.rand(2, 2, 37, dtype=torch.float64) + 0.1
    grad_out = torch.randn(2, 2, 37, 8, dtype=torch.float64)
    kernels = selector.kernels_for(implementation)
    config = KernelConfig(implementation, TAYLOR_3, chunk_size=8)

    out, denominator, state = kernels.forward(q.unsqueeze(2), k, v, weight, config, SCALE, causal, direct)
    grads = kernels.backward(grad_out.unsqueeze(2), q.unsqueeze(2), k, v, weight, out, denominator, state, config,
                             SCALE, causal, direct, True)

    inputs = [t.clone().requires_grad_() for t in (q, k, v, weight.log())]
    expected = polynomial_attention(*inputs[:3], TAYLOR_3, attn_mask=inputs[3].unsqueeze(-2), is_causal=causal,
                                    scale=SCALE)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    assert state.shape[-2] == (0 if direct else feature_dim(8, 3))  # the direct algorithm keeps no state
    torch.testing.assert_close(out.squeeze(2), expected, rtol=1e-10, atol=1e-12)
    dq, dk, dv, dw = grads
    for got, want in zip((dq.squeeze(2), dk, dv, dw * weight), expected_grads):  # d/dlog w = w d/dw
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_the_selector_hands_out_one_implementation_per_name_and_refuses_others():
    assert selector.kernels_for("torch") is selector.kernels_for("torch")
    with pytest.raises(ValueError, match="implementation must be one of"):
        selector.kernels_for("cuda")
