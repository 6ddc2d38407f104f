"""lrcompile.ops.algorithm and the direct kernels: the direct algorithm (C and torch) is the polynomial attention of the factored
one, forward and every gradient, and the op and the policy choose it as documented.

References are float64 (lrcompile.reference.polynomial_attention, quadratic and independent of
both algorithms) on fresh random inputs with the stated score range.
"""

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

from lrcompile.compile import calibration
from lrcompile.kernels import cpu
from lrcompile.math import flops
from lrcompile.ops import algorithm as choice
from lrcompile.ops.attention import default_chunk_size, lowrank_attention
from lrcompile.compile.backend import compile_graph
from lrcompile.compile.policy import Policy, decide
from lrcompile.math.polynomial import exp_polynomial
from lrcompile.reference import polynomial_attention, random_attention_inputs

SCORE_RANGE = 2.0
DEGREE = 2
COEFFICIENTS = list(exp_polynomial(DEGREE, 1.0, "taylor").coefficients)
# (batch, query heads, key/value heads, n_q, n_k): plain, GQA, cross-attention both ways
SHAPES = [(2, 4, 4, 37, 37), (2, 4, 2, 29, 29), (2, 2, 2, 20, 45), (2, 4, 1, 45, 20)]
MASKS = ["none", "bool", "float"]


@pytest.fixture(params=["c", "torch"])
def implementation(request, monkeypatch):
    """The direct algorithm forced, in C (the fused kernel) or in torch operations."""
    monkeypatch.setenv("LRCOMPILE_ALGORITHM", "direct")
    if request.param == "c":
        if cpu.library() is None:
            pytest.skip(f"no C kernels here: {cpu.status()}")
    else:
        monkeypatch.setattr(cpu, "direct_kernel", lambda *args: None)
    return request.param


def key_padding_mask(kind, batch, n_k, seed):
    """(batch, 1, 1, n_k): the last keys of batch entry 1 masked; float masks carry a gradient."""
    if kind == "none":
        return None
    generator = torch.Generator().manual_seed(seed)
    keep = torch.ones(batch, 1, 1, n_k, dtype=torch.bool)
    keep[1, ..., n_k // 2:] = False
    if kind == "bool":
        return keep
    mask = torch.randn(batch, 1, 1, n_k, generator=generator, dtype=torch.float64)
    return mask.masked_fill(~keep, float("-inf")).requires_grad_()


def gradients(out, inputs, seed):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad_out = grad_out.to(out.dtype)  # the same numbers for a float32 call and its float64 reference
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_direct_is_the_polynomial_attention_forward_and_every_gradient(implementation, shape, causal, mask_kind,
                                                                       dtype):
    batch, heads, kv_heads, n_q, n_k = shape
    q, k, v = random_attention_inputs(batch, heads, n_q, n_k, 8, score_range=SCORE_RANGE, kv_heads=kv_heads,
                                      dtype=dtype)
    mask = key_padding_mask(mask_kind, batch, n_k, seed=n_q)
    inputs = (q, k, v) + ((mask,) if mask_kind == "float" else ())
    gqa = kv_heads != heads
    op_mask = mask.to(dtype) if mask_kind == "float" else mask
    out, grads = gradients(lowrank_attention(q, k, v, op_mask, is_causal=causal, degree=DEGREE, enable_gqa=gqa),
                           inputs, 1)
    reference_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    q64, k64, v64 = reference_inputs[:3]
    mask64 = reference_inputs[3] if mask_kind == "float" else mask
    reference = polynomial_attention(q64, k64, v64, COEFFICIENTS, mask64, is_causal=causal, enable_gqa=gqa)
    expected, expected_grads = gradients(reference, reference_inputs, 1)
    # causal rows that see no valid key: the reference divides 0 by 0, the op returns zeros (SDPA's)
    seen = torch.isfinite(expected)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double()[seen], expected[seen], rtol=tolerance, atol=tolerance)
    assert (out[~seen] == 0).all()
    if not seen.all():
        return  # NaN in the reference's gradients: the zero rows are checked against factored below
    for name, got, want in zip("qkvm", grads, expected_grads):
        scale = want.abs().max().item() or 1.0
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("degree", [3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_other_degrees_are_the_polynomial_attention_too(implementation, degree, causal):
    q, k, v = random_attention_inputs(2, 2, 33, 33, 8, score_range=SCORE_RANGE)
    mask = key_padding_mask("float", 2, 33, seed=degree)
    polynomial = exp_polynomial(degree, SCORE_RANGE, "chebyshev")
    out, grads = gradients(lowrank_attention(q, k, v, mask, is_causal=causal, degree=degree, approximation="chebyshev",
                                             bound=SCORE_RANGE), (q, k, v, mask), 6)
    inputs64 = tuple(t.detach().requires_grad_() for t in (q, k, v, mask))
    expected, expected_grads = gradients(polynomial_attention(*inputs64[:3], list(polynomial.coefficients),
                                                              inputs64[3], is_causal=causal), inputs64, 6)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_with_no_key_to_attend_to_are_zero_and_send_nothing_back_like_factored(implementation, causal,
                                                                                     monkeypatch):
    q, k, v = random_attention_inputs(2, 2, 24, 24, 8, score_range=SCORE_RANGE)
    keep = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    keep[0] = False  # batch entry 0: every key masked
    keep[1, ..., :5] = False  # entry 1: left padding, so causal rows 0..4 see no key
    results = {}
    for algorithm in ("direct", "factored"):
        monkeypatch.setenv("LRCOMPILE_ALGORITHM", algorithm)
        results[algorithm] = gradients(lowrank_attention(q, k, v, keep, is_causal=causal, degree=DEGREE), (q, k, v), 2)
    (out, grads), (expected, expected_grads) = results["direct"], results["factored"]
    assert (out[0] == 0).all() and (grads[0][0] == 0).all()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_c_kernel_and_torch_core_agree_in_float32(monkeypatch):
    if cpu.library() is None:
        pytest.skip(f"no C kernels here: {cpu.status()}")
    monkeypatch.setenv("LRCOMPILE_ALGORITHM", "direct")
    q, k, v = random_attention_inputs(2, 4, 70, 70, 16, score_range=SCORE_RANGE, kv_heads=2, dtype=torch.float32)
    in_c = gradients(lowrank_attention(q, k, v, is_causal=True, degree=DEGREE, enable_gqa=True), (q, k, v), 3)
    monkeypatch.setattr(cpu, "direct_kernel", lambda *args: None)
    in_torch = gradients(lowrank_attention(q, k, v, is_causal=True, degree=DEGREE, enable_gqa=True), (q, k, v), 3)
    for got, want in zip((in_c[0], *in_c[1]), (in_torch[0], *in_torch[1])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- the op's choice --------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_the_op_switches_at_the_crossover_and_both_sides_compute_the_same_function(causal, monkeypatch):
    monkeypatch.delenv("LRCOMPILE_ALGORITHM", raising=False)
    head_dim = 8
    chunk = 32  # small, so that the crossover is a short length
    switch = choice.crossover_length(head_dim, head_dim, causal, DEGREE, chunk)
    assert choice.uses_direct(switch - 1, switch - 1, head_dim, head_dim, 1, DEGREE, causal, chunk, "cpu")
    assert not choice.uses_direct(switch, switch, head_dim, head_dim, 1, DEGREE, causal, chunk, "cpu")
    for n in (switch - 1, switch):
        q, k, v = random_attention_inputs(2, 2, n, n, head_dim, score_range=SCORE_RANGE)
        results = {}
        for algorithm in ("auto", "direct", "factored"):
            monkeypatch.setenv("LRCOMPILE_ALGORITHM", algorithm)
            out = lowrank_attention(q, k, v, is_causal=causal, degree=DEGREE, chunk_size=chunk)
            results[algorithm] = gradients(out, (q, k, v), 4)
        for other in ("direct", "factored"):
            torch.testing.assert_close(results["auto"][0], results[other][0], rtol=1e-10, atol=1e-12)
            for got, want in zip(results["auto"][1], results[other][1]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_rule_prefers_direct_for_short_and_factored_for_long_sequences():
    for head_dim, causal in ((32, False), (64, False), (32, True), (64, True)):
        chunk = default_chunk_size(head_dim, DEGREE, causal)
        assert choice.uses_direct(256, 256, head_dim, head_dim, 1, DEGREE, causal, chunk, "cpu")
        assert not choice.uses_direct(32768, 32768, head_dim, head_dim, 1, DEGREE, causal, chunk, "cpu")


def test_a_device_without_a_measured_rate_ratio_keeps_the_factored_algorithm(monkeypatch):
    monkeypatch.delenv("LRCOMPILE_ALGORITHM", raising=False)
    assert choice.uses_direct(64, 64, 32, 32, 1, DEGREE, False, 128, "cpu")
    assert not choice.uses_direct(64, 64, 32, 32, 1, DEGREE, False, 128, "cuda")


def test_direct_flops_count_the_visible_pairs():
    assert flops.direct_flops(10, 10, 4, 4, 1, False) == 100 * 2 * (16 + 15)
    assert flops.direct_flops(10, 10, 4, 4, 1, True) == 55 * 2 * (16 + 15)
    assert flops.direct_flops(10, 4, 4, 4, 1, True) == (10 + 6 * 4) * 2 * (16 + 15)  # rows past n_k see all


def test_a_forced_algorithm_must_be_one_of_the_known(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_ALGORITHM", "quadratic")
    with pytest.raises(ValueError, match="LRCOMPILE_ALGORITHM must be one of"):
        choice.forced_algorithm()


def test_a_compiled_model_under_allow_computes_short_sites_directly_with_the_eager_values(monkeypatch, fresh_dynamo):
    """The policy rewrites the short site (not kept exact), and the op under AOTAutograd computes the
    polynomial attention directly, with the values and gradients of the eager op."""
    monkeypatch.delenv("LRCOMPILE_ALGORITHM", raising=False)
    q, k, v = random_attention_inputs(2, 2, 16, 16, 8, score_range=SCORE_RANGE, dtype=torch.float32)
    assert choice.uses_direct(16, 16, 8, 8, 1, DEGREE, True, default_chunk_size(8, DEGREE, True), "cpu")

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def compiler(gm, example_inputs):
        return compile_graph(gm, example_inputs, Policy(on_inaccurate="allow"), inner=aot_eager)
    compiled = gradients(torch.compile(attend, backend=compiler)(q, k, v), (q, k, v), 5)
    eager = gradients(lowrank_attention(q, k, v, is_causal=True, degree=DEGREE), (q, k, v), 5)
    for got, want in zip((compiled[0], *compiled[1]), (eager[0], *eager[1])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (compiled[0] - attend(q, k, v)).abs().max() > 1e-4  # the polynomial, not exact softmax


# ---- the policy -------------------------------------------------------------------------------


def site(n, causal=False, device="cpu"):
    return SimpleNamespace(
        name="softmax", module_path="h.0.attn", supported=True, reason="", replacement=None, is_causal=causal,
        query_shape=(2, 4, n, 64), key_shape=(2, 4, n, 64), value_shape=(2, 4, n, 64), device=device,
        masked_rows="visible",
    )


@pytest.mark.parametrize("causal", [False, True])
def test_when_the_polynomial_is_the_model_short_sites_are_rewritten_not_kept_exact(causal):
    if cpu.library() is None:
        pytest.skip(f"the CPU calibration needs the C kernels: {cpu.status()}")
    short = calibration.lookup("cpu", "c").calibration.shortest_crossover // 8  # conftest's calibration
    assert not decide(site(short, causal), Policy()).rewrite  # approximating softmax: exact is kept below
    decision = decide(site(short, causal), Policy(on_inaccurate="allow"))
    assert decision.rewrite and decision.reason == ""
    assert decision.config.on_inaccurate == "allow"


def test_when_the_polynomial_is_the_model_an_uncalibrated_device_is_rewritten_too():
    assert not decide(site(256, device="cuda"), Policy()).rewrite
    assert decide(site(256, device="cuda"), Policy(on_inaccurate="allow")).rewrite
