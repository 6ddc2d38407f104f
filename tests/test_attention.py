"""lowrank_attention against quadratic float64 references.

Factored vs. the same polynomial attention computed quadratically must agree to rounding (a
kernel bug shows here); quadratic polynomial vs. exact softmax differs by approximation error,
which must stay within the reported bound.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import attention_inputs, max_error
from lrcompile import lowrank_attention
from lrcompile.kernels import cpu, selector
from lrcompile.math.features import feature_dim
from lrcompile.math.polynomial import exp_polynomial
from lrcompile.reference import exact_attention, polynomial_attention

CASES = {
    "plain": dict(),
    "chunked": dict(chunk_size=5),
    "cross_attention": dict(n_q=11, n_k=29, chunk_size=8),
    "value_dim_differs": dict(value_dim=5),
    "scale": dict(scale=0.3),
    "causal": dict(is_causal=True, chunk_size=8),
    "causal_one_chunk": dict(is_causal=True),
    "causal_more_keys": dict(is_causal=True, n_q=19, n_k=33, chunk_size=6),
    "causal_more_queries": dict(is_causal=True, n_q=33, n_k=19, chunk_size=6),
    "bool_padding": dict(mask="bool", chunk_size=7),
    "float_padding": dict(mask="float", chunk_size=7),
    "causal_padding": dict(mask="bool", is_causal=True, chunk_size=7),
    "gqa": dict(kv_heads=1, enable_gqa=True, chunk_size=9),
    "gqa_causal_padding": dict(heads=4, kv_heads=2, enable_gqa=True, is_causal=True, mask="float", chunk_size=9),
    "degree_1": dict(degree=1, bound=0.9),
    "degree_3_causal": dict(degree=3, bound=1.0, is_causal=True, chunk_size=10),
    "degree_4": dict(degree=4),
    "chebyshev": dict(approximation="chebyshev", degree=3, bound=1.0, mask="bool"),
}


def make_mask(kind, batch, n_k, seed=0):
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, 1, 1, n_k, generator=generator) > 0.3
    keep[..., 0] = True  # every row keeps a key: a fully masked row is NaN in SDPA and here
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(keep.shape, generator=generator, dtype=torch.float64), float("-inf"))


def run_case(case, dtype=torch.float64):
    case = dict(case)
    shape = {key: case.pop(key) for key in ("heads", "kv_heads", "n_q", "n_k", "value_dim") if key in case}
    q, k, v = attention_inputs(score_range=1.0, dtype=dtype, **shape)
    mask = make_mask(case.pop("mask", None), q.shape[0], k.shape[-2])
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)  # SDPA takes a float mask in float32 or q's dtype only
    out = lowrank_attention(q, k, v, attn_mask=mask, **case)
    degree, approximation = case.get("degree", 2), case.get("approximation", "taylor")
    polynomial = exp_polynomial(degree, case.get("bound", 1.0), approximation)
    reference = polynomial_attention(
        q, k, v, polynomial.coefficients, attn_mask=mask, is_causal=case.get("is_causal", False),
        scale=case.get("scale"), enable_gqa=case.get("enable_gqa", False),
    )
    return (q, k, v), out, reference


@pytest.fixture(params=["c_sweep", "c_kernels", "torch"])
def kernels(request, monkeypatch):
    """Every implementation of the sweeps: all in C (lrcompile.kernels.cpu.Sweep); the torch sweep
    calling the C feature maps and in-chunk blocks; torch operations only."""
    if request.param == "c_kernels":
        monkeypatch.setattr(cpu, "runs_c_sweep", lambda *args, **kwargs: False)
    elif request.param == "torch":
        monkeypatch.setenv("LRCOMPILE_KERNELS", "torch")
    return request.param


@pytest.mark.parametrize("name", CASES)
def test_factored_matches_quadratic_polynomial_attention(name, kernels):
    inputs, out, reference = run_case(CASES[name])
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(reference)
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(reference, inputs, grad_out)
    for name_, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name_}")


@pytest.mark.parametrize("name", ["plain", "causal", "gqa_causal_padding", "float_padding"])
def test_float32_agrees_with_float64_reference_to_float32_rounding(name, kernels):
    inputs, out, reference = run_case(CASES[name], dtype=torch.float32)
    assert out.dtype == torch.float32
    assert max_error(out, reference) < 2e-5
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(reference, inputs, grad_out.double())
    for a, b in zip(got, expected):
        assert max_error(a, b) < 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck_including_float_mask(is_causal):
    q, k, v = attention_inputs(1, 2, 6, 6, 3, score_range=1.0)
    mask = torch.randn(1, 1, 1, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, m: lowrank_attention(q, k, v, attn_mask=m, is_causal=is_causal, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("approximation", ["taylor", "chebyshev"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_error_against_exact_attention_falls_as_degree_rises(approximation, is_causal):
    q, k, v = attention_inputs(n_q=64, n_k=64, head_dim=16, score_range=2.0, requires_grad=False)
    exact = exact_attention(q, k, v, is_causal=is_causal)
    errors = [
        max_error(lowrank_attention(q, k, v, is_causal=is_causal, degree=g, approximation=approximation, bound=2.0), exact)
        for g in (2, 4, 6)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


# (degree, score range) pairs whose Taylor polynomial is positive with relative error < 1
BOUNDED = [(2, 0.5), (2, 1.0), (3, 0.5), (3, 1.0), (4, 1.0), (6, 2.0)]


@pytest.mark.parametrize("degree, score_range", BOUNDED)
@pytest.mark.parametrize("is_causal", [False, True])
def test_measured_error_never_exceeds_reported_bound(degree, score_range, is_causal):
    q, k, v = attention_inputs(n_q=48, n_k=48, head_dim=16, score_range=score_range, requires_grad=False)
    polynomial = exp_polynomial(degree, score_range, "taylor")
    assert polynomial.output_error_factor < math.inf
    out = lowrank_attention(q, k, v, is_causal=is_causal, degree=degree, bound=score_range)
    error = max_error(out, exact_attention(q, k, v, is_causal=is_causal))
    assert error <= polynomial.output_error_factor * v.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32_and_returns_its_dtype(dtype):
    q, k, v = attention_inputs(n_q=40, n_k=40, head_dim=16, dtype=dtype)
    out = lowrank_attention(q, k, v, is_causal=True, chunk_size=16)
    assert out.dtype == dtype
    reference = lowrank_attention(q.float(), k.float(), v.float(), is_causal=True, chunk_size=16)
    assert max_error(out, reference) < 4 * torch.finfo(dtype).eps
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_three_dimensional_inputs_and_extra_batch_axes():
    q, k, v = attention_inputs(2, 3, 10, 12, 4)
    expected = lowrank_attention(q, k, v)
    torch.testing.assert_close(lowrank_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)), expected.flatten(0, 1))
    torch.testing.assert_close(lowrank_attention(q[None], k[None], v[None])[0], expected)


def test_key_padding_mask_is_exact_on_padded_keys():
    q, k, v = attention_inputs(1, 2, 16, 16, 4)
    mask = torch.ones(1, 1, 1, 16, dtype=torch.bool)
    mask[..., 10:] = False
    out = lowrank_attention(q, k, v, attn_mask=mask, is_causal=True, chunk_size=5)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[..., 10:, :] = 100.0  # garbage in padded keys changes nothing, not even the centring
    v2[..., 10:, :] = -7.0
    torch.testing.assert_close(lowrank_attention(q, k2, v2, attn_mask=mask, is_causal=True, chunk_size=5), out)
    out.sum().backward()
    assert k.grad[..., 10:, :].abs().max() == 0 and v.grad[..., 10:, :].abs().max() == 0


def test_causal_output_does_not_depend_on_later_keys():
    q, k, v = attention_inputs(1, 1, 20, 20, 4, requires_grad=False)
    out = lowrank_attention(q, k, v, is_causal=True, chunk_size=6)
    k2, v2 = k.clone(), v.clone()
    k2[..., 13:, :] *= -2
    v2[..., 13:, :] += 5
    torch.testing.assert_close(lowrank_attention(q, k2, v2, is_causal=True, chunk_size=6)[..., :13, :], out[..., :13, :])


def test_mask_with_a_constant_query_axis_is_accepted_in_eager_mode():
    q, k, v = attention_inputs(2, 2, 9, 9, 4, requires_grad=False)
    mask = make_mask("float", 2, 9)
    expanded = mask.expand(2, 1, 9, 9)  # how transformers hands over padding masks
    torch.testing.assert_close(lowrank_attention(q, k, v, attn_mask=expanded), lowrank_attention(q, k, v, attn_mask=mask))


def test_default_degree_2_follows_sdpa_semantics_in_float32():
    q, k, v = attention_inputs(2, 4, 50, 50, 16, score_range=0.5, dtype=torch.float32, requires_grad=False)
    mask = make_mask("bool", 2, 50)
    for kwargs in (dict(), dict(is_causal=True), dict(attn_mask=mask), dict(scale=0.1)):
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
        assert max_error(lowrank_attention(q, k, v, **kwargs), expected) < 0.05, kwargs


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any operation produces (on this thread)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.operations += 1
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("is_causal", [False, True])
def test_no_tensor_grows_like_n_squared_or_n_times_r(is_causal, monkeypatch):
    from lrcompile.ops.factored_op import factored_attention, factored_attention_backward

    n, head_dim, chunk = 4096, 8, 256
    r = feature_dim(head_dim, 2)
    q, k, v = (t.detach() for t in attention_inputs(1, 2, n, n, head_dim, dtype=torch.float32))
    config = ([1.0, 1.0, 0.5], head_dim**-0.5, is_causal, chunk)
    # A dispatch mode does not see inside a custom op, nor into other threads, nor C's buffers: run
    # the op's own implementation here, on this thread, with the torch sweep (the C sweep's peak
    # memory is checked in test_native.py).
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(cpu, "runs_c_sweep", lambda *args, **kwargs: False)
    implementation = selector.select("cpu", torch.float32, 2, head_dim, head_dim)  # C feature maps if built
    with LargestAllocation() as mode:
        out, denominator, state, _ = factored_attention._init_fn(q.unsqueeze(2), k, v, None, *config, 0.0, "allow", "test",
                                                                 implementation)
        factored_attention_backward._init_fn(torch.ones_like(out), q.unsqueeze(2), k, v, None, out, denominator,
                                             state, torch.tensor(False), *config, False, implementation)
    assert mode.operations > 4 * n // chunk  # the chunk loops ran under the mode
    # the largest tensors (2 heads): a chunk of features (r x chunk, r = 45 here), the causal
    # in-chunk block (chunk x chunk), O(n (d + 1)) inputs, gradients and state products
    assert mode.largest <= 2 * max(r * chunk, chunk * chunk, n * (head_dim + 1))
    assert mode.largest < 2 * n * r  # one n x r block of either head would be this big


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(attn_mask=torch.ones(2, 3, 10, 10).tril().bool()), ValueError, "varies along the query axis"),
        (dict(attn_mask=torch.ones(2, 3, 1, 7)), ValueError, "does not broadcast"),
        (dict(attn_mask=torch.ones(2, 3, 1, 10, dtype=torch.int64)), ValueError, "boolean, float32 or query's dtype"),
        (dict(attn_mask=torch.ones(2, 3, 1, 10, dtype=torch.float64)), ValueError, "boolean, float32 or query's dtype"),
        (dict(scale=float("inf")), ValueError, "scale must be a finite number"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(degree=3, approximation="taylor", bound=5.0), ValueError, "not positive"),
        (dict(approximation="pade"), ValueError, "approximation"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    q, k, v = attention_inputs(2, 3, 10, 10, 4, dtype=torch.float32, requires_grad=False)
    with pytest.raises(error, match=message):
        lowrank_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "shapes, kwargs, message",
    [
        (((2, 4, 8, 4), (2, 4, 8, 5), (2, 4, 8, 4)), {}, "same last dimension"),
        (((2, 4, 8, 4), (2, 4, 8, 4), (2, 4, 9, 4)), {}, "same number of keys"),
        (((2, 4, 8, 4), (2, 2, 8, 4), (2, 2, 8, 4)), {}, "enable_gqa=True"),
        (((2, 4, 8, 4), (2, 3, 8, 4), (2, 3, 8, 4)), dict(enable_gqa=True), "multiple"),
        (((2, 4, 8, 4), (3, 4, 8, 4), (3, 4, 8, 4)), {}, "do not broadcast"),
    ],
)
def test_bad_shapes_raise_clear_errors(shapes, kwargs, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        lowrank_attention(q, k, v, **kwargs)


def test_scores_beyond_the_given_bound_warn():
    q, k, v = attention_inputs(1, 1, 12, 12, 4, score_range=3.0, requires_grad=False)
    with pytest.warns(UserWarning, match="exceeds bound"):
        lowrank_attention(q, k, v, degree=3, approximation="chebyshev", bound=1.0)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("guard", [(0.01, "allow"), (0.0, "exact")])  # the second always falls back
@pytest.mark.parametrize("implementation", ["c", "torch"])
def test_custom_ops_pass_torch_library_opcheck(is_causal, guard, implementation):
    from lrcompile.ops.factored_op import factored_attention

    if implementation == "c" and selector.why_not("c", "cpu", torch.float64, 2, 4, 4):
        pytest.skip("C kernels unavailable")
    q, k, v = attention_inputs(1, 2, 9, 9, 4)
    q5 = q.detach().reshape(1, 2, 1, 9, 4).requires_grad_()
    weight = torch.rand(1, 2, 9, dtype=torch.float64)
    torch.library.opcheck(factored_attention, (q5, k, v, weight, [1.0, 1.0, 0.5], 0.5, is_causal, 4, *guard, "test",
                                               implementation))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["plain", "causal", "gqa_causal_padding", "float_padding"])
def test_cuda_agrees_with_the_float64_reference(name):
    case = dict(CASES[name])
    inputs, _, reference = run_case(case, dtype=torch.float32)
    mask = make_mask(case.pop("mask", None), inputs[0].shape[0], inputs[1].shape[-2])
    for key in ("heads", "kv_heads", "n_q", "n_k", "value_dim"):
        case.pop(key, None)
    cuda = [t.detach().cuda().requires_grad_() for t in inputs]
    out = lowrank_attention(*cuda, attn_mask=None if mask is None else mask.cuda(), **case)
    assert out.is_cuda and max_error(out.cpu(), reference) < 2e-5
    grad_out = torch.randn_like(reference)
    got = torch.autograd.grad(out, cuda, grad_out.float().cuda())
    expected = torch.autograd.grad(reference, inputs, grad_out)
    for a, b in zip(got, expected):
        assert max_error(a.cpu(), b) < 1e-4 * max(1.0, b.abs().max().item())


def test_sdpa_positional_call_reads_dropout_p_then_is_causal():
    q, k, v = attention_inputs(2, 2, 12, 12, 4, score_range=0.5, requires_grad=False)
    out = lowrank_attention(q, k, v, None, 0.0, True, degree=8)  # SDPA's (attn_mask, dropout_p, is_causal)
    torch.testing.assert_close(out, lowrank_attention(q, k, v, is_causal=True, degree=8))
    assert max_error(out, exact_attention(q, k, v, is_causal=True)) < 1e-4
    with pytest.raises(ValueError, match="dropout_p must be 0.0"):
        lowrank_attention(q, k, v, None, 0.1)


def test_nan_inputs_are_named_not_an_unasked_bound():
    q, k, v = attention_inputs(1, 1, 6, 6, 4, requires_grad=False)
    q[0, 0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="query or key holds NaN or inf"):
        lowrank_attention(q, k, v, degree=3)


def test_float_mask_requiring_grad_with_equal_query_rows_is_a_key_padding_mask():
    q, k, v = attention_inputs(2, 2, 9, 9, 4, score_range=0.5)
    leaf = make_mask("float", 2, 9).requires_grad_()
    out = lowrank_attention(q, k, v, attn_mask=leaf.expand(2, 1, 9, 9), degree=8)
    exact = exact_attention(q, k, v, attn_mask=leaf.expand(2, 1, 9, 9))
    assert max_error(out, exact) < 1e-5
    grad_out = torch.randn_like(exact)
    got = torch.autograd.grad(out, (q, k, v, leaf), grad_out)
    expected = torch.autograd.grad(exact, (q, k, v, leaf), grad_out)
    for a, b in zip(got, expected):
        assert max_error(a, b) < 1e-4


@pytest.mark.parametrize("kind", ["bool", "float_neg_inf"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_fully_masked_rows_are_zero_with_finite_gradients_as_in_sdpa(kind, is_causal):
    # score range 0.5; batch entry 0 left-padded by 4 (causally its first 4 rows see no key),
    # batch entry 1 has no key at all (every row fully masked)
    q, k, v = attention_inputs(2, 2, 10, 10, 4, score_range=0.5)
    attend = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    attend[0, ..., :4] = False
    attend[1] = False
    mask = attend if kind == "bool" else torch.zeros(attend.shape, dtype=torch.float64).masked_fill(~attend, -math.inf)
    out = lowrank_attention(q, k, v, attn_mask=mask, is_causal=is_causal, degree=8, chunk_size=3)
    # float64 SDPA: zeros on fully masked rows; the pair (mask, is_causal) as one bool mask
    causal = torch.ones(10, 10, dtype=torch.bool).tril() if is_causal else torch.ones(10, 10, dtype=torch.bool)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=attend & causal)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    assert max_error(out, sdpa) < 1e-5
    grad_out = torch.randn_like(sdpa)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(sdpa, (q, k, v), grad_out)
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all() and max_error(a, b) < 1e-4


def test_finfo_min_left_padding_averages_the_visible_keys_like_the_eager_spelling():
    # softmax(x + finfo.min) rounds x away: a causal row whose visible keys are all padded is the
    # plain average of their values, in the float64 reference as in the eager model. Range 0.5.
    q, k, v = attention_inputs(2, 2, 8, 8, 4, score_range=0.5)
    mask = torch.zeros(2, 1, 1, 8, dtype=torch.float64)
    mask[0, ..., :3] = torch.finfo(torch.float32).min
    out = lowrank_attention(q, k, v, attn_mask=mask, is_causal=True, degree=8)
    exact = exact_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert max_error(out, exact) < 1e-5
    torch.testing.assert_close(out[0, :, 1], v[0, :, :2].mean(-2))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("scale", [0.0, -0.7, -1e4])
@pytest.mark.parametrize("is_causal", [False, True])
def test_zero_and_negative_scales_match_exact_attention(scale, is_causal):
    q, k, v = attention_inputs(2, 2, 11, 11, 4, score_range=0.5)
    s = abs(scale) or 1.0
    q2, k2 = (t.detach() * math.sqrt(0.5 / s) for t in (q, k))  # |s q.k| <= 0.5 * 0.5 / range
    q2.requires_grad_(), k2.requires_grad_()
    out = lowrank_attention(q2, k2, v, is_causal=is_causal, scale=scale, degree=8)
    exact = exact_attention(q2, k2, v, is_causal=is_causal, scale=scale)
    assert max_error(out, exact) < 1e-5
    grad_out = torch.randn_like(exact)
    for a, b in zip(torch.autograd.grad(out, (q2, k2, v), grad_out), torch.autograd.grad(exact, (q2, k2, v), grad_out)):
        assert max_error(a, b) < 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("shapes", [
    ((3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4)),      # query with fewer leading axes (the OpInfo's case)
    ((2, 1, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4)),   # one query head
    ((2, 3, 5, 4), (1, 1, 7, 4), (1, 1, 7, 4)),   # one key/value batch entry and head: shared state
    ((2, 3, 5, 4), (2, 1, 7, 4), (1, 3, 7, 4)),   # key and value broadcast differently
])
def test_batch_and_head_axes_broadcast_as_in_sdpa(shapes):
    q, k, v = (torch.randn(s, dtype=torch.float64) * 0.4 for s in shapes)  # |s q.k| <= ~0.5
    out = lowrank_attention(q, k, v, degree=8)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == sdpa.shape and max_error(out, sdpa) < 1e-5


@pytest.mark.parametrize("shapes", [
    ((0, 2, 5, 4), (0, 2, 7, 4)), ((2, 0, 5, 4), (2, 0, 7, 4)), ((2, 2, 0, 4), (2, 2, 7, 4)), ((2, 2, 5, 4), (2, 2, 0, 4)),
])
def test_empty_axes_give_sdpa_results_and_gradients(shapes):
    q, k, v = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in (shapes[0], shapes[1], shapes[1]))
    out = lowrank_attention(q, k, v, is_causal=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == sdpa.shape and torch.equal(out, sdpa)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(sdpa.sum(), (q, k, v))):
        assert torch.equal(a, b)


def test_masked_rows_all_averages_every_key_with_softmaxs_gradient_as_the_eager_spelling():
    """A causal mask with a finite fill (transformers' eager masks: where(causal & padding, 0, finfo.min))
    leaves a left-padded row every key at one score: its output averages all values, and autograd
    gives softmax's gradient through the rounded-away scores. Against float64 of that very spelling,
    every row in the loss; masked_rows="visible" (SDPA's is_causal) averages the visible keys."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (0.1 * torch.randn(2, 2, 40, 8, generator=generator) for _ in range(3))  # |s q.k| <= ~0.1
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :6] = False  # left padding: rows 0..5 of sequence 1 see only padding
    fill = torch.finfo(torch.float32).min
    key_mask = torch.where(valid, 0.0, fill)[:, None, None, :]
    eager_mask = torch.where(torch.ones(40, 40, dtype=torch.bool).tril() & valid[:, None, None, :], 0.0, fill)
    grad_out = torch.randn(2, 2, 40, 8, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = lowrank_attention(*leaves, attn_mask=key_mask, is_causal=True, degree=6, masked_rows="all")
    grads = torch.autograd.grad(out, leaves, grad_out)
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    scores = exact_leaves[0] @ exact_leaves[1].mT / math.sqrt(8) + eager_mask.double()  # finfo.min: scores round away
    exact = torch.softmax(scores, -1) @ exact_leaves[2]
    exact_grads = torch.autograd.grad(exact, exact_leaves, grad_out.double())
    assert max_error(out, exact) < 1e-6
    for name, grad, exact_grad in zip("qkv", grads, exact_grads):
        assert max_error(grad, exact_grad) < 1e-5, name
    visible = lowrank_attention(q, k, v, attn_mask=key_mask, is_causal=True, degree=6)
    assert max_error(visible[1, :, :6], v[1].cumsum(-2)[:, :6] / torch.arange(1, 7)[:, None]) < 1e-6
    with pytest.raises(ValueError, match="masked_rows must be one of"):
        lowrank_attention(q, k, v, is_causal=True, masked_rows="none")
