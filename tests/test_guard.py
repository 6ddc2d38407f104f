"""The run-time accuracy guard: estimates, fallbacks to exact attention, counters, and explain.

References are float64 SDPA-semantics attention (lrcompile.reference.exact_attention) on fresh
random inputs with a stated score range: narrow (0.2, where degree 4 is accurate to ~1e-5) or
wide (8, where degree 2 is off by tens of percent).
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrcompile
from conftest import attention_inputs, max_error
from lrcompile import lowrank_attention
from lrcompile.ops import guard
from lrcompile.reference import exact_attention


@pytest.fixture(autouse=True)
def _fresh_counters():
    lrcompile.reset_stats()
    yield
    lrcompile.reset_stats()


def _kernel_layout_inputs(groups=2, n_q=40, n_k=40, causal_safe=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, groups, n_q, 8, dtype=torch.float64, generator=generator)
    k = torch.randn(2, 2, n_k, 8, dtype=torch.float64, generator=generator)
    v = torch.randn(2, 2, n_k, 5, dtype=torch.float64, generator=generator)
    weight = torch.rand(2, 2, n_k, dtype=torch.float64, generator=generator)
    weight[weight < 0.3] = 0.0  # padded keys
    weight[0, 0, :3] = 0.0  # with the causal mask, rows 0..2 of this head see only padded keys
    weight[1, 1] = 0.0  # a head whose every row is fully masked
    return q, k, v, weight


def _reference(q, k, v, log_weight, scale, causal):
    """float64 SDPA (math backend) in the kernel layout, with mask log w (+ the causal mask): its
    fully masked rows, and their gradients, are 0."""
    groups, (n_q, n_k) = q.shape[2], (q.shape[-2], k.shape[-2])
    mask = log_weight[:, :, None, None, :].expand(-1, -1, groups, n_q, -1)
    if causal:
        mask = mask.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(), float("-inf"))
    expand = lambda t: t.unsqueeze(2).expand(-1, -1, groups, -1, -1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, expand(k), expand(v), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_fallback_and_its_gradients_match_the_float64_reference(causal):
    q, k, v, weight = _kernel_layout_inputs()
    log_weight = torch.log(weight).requires_grad_()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = 0.4
    out = guard.exact_attention(q, k, v, weight, scale, causal)
    expected = _reference(q, k, v, log_weight, scale, causal)
    assert max_error(out, expected) < 1e-12
    grad_out = torch.randn_like(out)
    got = guard.exact_attention_backward(grad_out, q.detach(), k.detach(), v.detach(), weight, scale,
                                         causal, key_weight_grad=True)
    wanted = list(torch.autograd.grad(expected, (q, k, v, log_weight), grad_out))
    wanted[3] = torch.where(weight > 0, wanted[3] / weight, 0.0)  # d/dw = d/dlog w / w, on weighted keys
    for name, a, b in zip("qkvw", got, wanted):
        assert torch.isfinite(a).all(), name
        assert max_error(a, b) < 1e-10, name


def test_sampled_rows_include_the_rows_of_largest_query_norm():
    q = torch.randn(1, 1, 1, 500, 8)
    q[0, 0, 0, 321] *= 50
    rows = guard.sampled_rows(q, guard.SAMPLED_ROWS)
    assert rows.shape == (1, 1, 1, guard.SAMPLED_ROWS)
    assert 321 in rows.tolist()[0][0][0]
    assert guard.sampled_rows(q[..., :7, :], 32).tolist() == [[[list(range(7))]]]


def test_estimate_finds_the_error_of_a_single_wide_row():
    """All rows but one have tiny scores; the wide row is where degree 2 fails, and the guard must
    see it although it checks only SAMPLED_ROWS of 400 rows."""
    q, k, v = attention_inputs(1, 1, 400, 400, 8, score_range=0.05, requires_grad=False)
    q[..., 137, :] *= 600  # scores of row 137 reach ~30
    approx = lowrank_attention(q, k, v, degree=2)
    exact = exact_attention(q, k, v)
    # the guard's metric: a row's error relative to the rms row norm of the whole output
    true_error = ((approx - exact).norm(dim=-1) / approx.square().sum(-1).mean(-1, keepdim=True).sqrt()).max().item()
    assert true_error > 0.05
    q5, k4, v4 = q.unsqueeze(2).float(), k.float(), v.float()
    estimate = guard.estimate_error(approx.unsqueeze(2).float(), q5, k4, v4, None, 8**-0.5, False)
    assert estimate == pytest.approx(true_error, rel=1e-3)


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True, chunk_size=16),
    "padding": dict(mask=True),
    "gqa_causal": dict(is_causal=True, enable_gqa=True, kv_heads=1, chunk_size=16),
}


def _case_inputs(case, score_range):
    case = dict(case)
    kv_heads = case.pop("kv_heads", 2)
    q, k, v = attention_inputs(2, 2, 48, 48, 8, kv_heads=kv_heads, score_range=score_range)
    if case.pop("mask", False):
        keep = torch.rand(2, 1, 1, 48) > 0.3
        keep[..., 0] = True
        case["attn_mask"] = keep
    return (q, k, v), case


@pytest.mark.parametrize("name", list(CASES))
def test_accurate_calls_keep_the_low_rank_result(name):
    (q, k, v), case = _case_inputs(CASES[name], score_range=0.2)
    guarded = lowrank_attention(q, k, v, **case, degree=4, on_inaccurate="exact", site_label="narrow")
    unguarded = lowrank_attention(q, k, v, **case, degree=4)
    assert torch.equal(guarded, unguarded)
    stats = lrcompile.stats()["narrow"]
    assert (stats.calls, stats.fallbacks) == (1, 0) and 0 < stats.largest_error < 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_inaccurate_calls_return_exact_attention_forward_and_backward(name):
    (q, k, v), case = _case_inputs(CASES[name], score_range=8.0)
    out = lowrank_attention(q, k, v, **case, degree=2, on_inaccurate="exact", site_label="wide")
    expected = exact_attention(q, k, v, **{key: value for key, value in case.items() if key != "chunk_size"})
    assert max_error(out, expected) < 1e-12
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    wanted = torch.autograd.grad(expected, (q, k, v), grad_out)
    for a, b in zip(got, wanted):
        assert max_error(a, b) < 1e-10
    stats = lrcompile.stats()["wide"]
    assert (stats.calls, stats.fallbacks) == (1, 1) and stats.largest_error > 0.05


def test_float_mask_gradient_follows_the_exact_fallback():
    q, k, v = attention_inputs(1, 2, 30, 30, 8, score_range=8.0)
    mask = torch.randn(1, 1, 1, 30, dtype=torch.float64, requires_grad=True)
    out = lowrank_attention(q, k, v, attn_mask=mask, degree=2, on_inaccurate="exact", site_label="wide")
    expected = exact_attention(q, k, v, attn_mask=mask)
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v, mask), grad_out)
    wanted = torch.autograd.grad(expected, (q, k, v, mask), grad_out)
    for a, b in zip(got, wanted):
        assert max_error(a, b) < 1e-10
    assert lrcompile.stats()["wide"].fallbacks == 1


def test_a_user_bound_the_scores_exceed_is_caught():
    """Taylor degree 3 promised accurate on [-1, 1], used on scores of range 5."""
    q, k, v = attention_inputs(1, 2, 40, 40, 8, score_range=5.0, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the op's own "exceeds bound" warning
        out = lowrank_attention(q, k, v, degree=3, bound=1.0, on_inaccurate="exact", site_label="bounded")
    assert max_error(out, exact_attention(q, k, v)) < 1e-12
    assert lrcompile.stats()["bounded"].fallbacks == 1


def test_warn_returns_the_low_rank_result_and_warns_once_per_site():
    q, k, v = attention_inputs(1, 2, 40, 40, 8, score_range=8.0, requires_grad=False)
    with pytest.warns(UserWarning, match=r"site a .*estimated output error of"):
        first = lowrank_attention(q, k, v, on_inaccurate="warn", site_label="a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank_attention(q, k, v, on_inaccurate="warn", site_label="a")  # no second warning
    assert torch.equal(first, lowrank_attention(q, k, v))
    assert lrcompile.stats()["a"].calls == 2 and lrcompile.stats()["a"].fallbacks == 0


def test_error_raises_naming_the_site_the_estimate_and_the_field():
    q, k, v = attention_inputs(1, 2, 40, 40, 8, score_range=8.0, requires_grad=False)
    with pytest.raises(lrcompile.InaccurateAttentionError, match=r"site h\.0\.attn:sdpa .*error of [\d.e+-]+ .*max_error=0\.01"):
        lowrank_attention(q, k, v, on_inaccurate="error", site_label="h.0.attn:sdpa")


def test_allow_checks_nothing_and_counts_calls():
    q, k, v = attention_inputs(1, 2, 40, 40, 8, score_range=8.0, requires_grad=False)
    out = lowrank_attention(q, k, v, on_inaccurate="allow", site_label="model")
    assert max_error(out, exact_attention(q, k, v)) > 0.05
    assert lrcompile.stats()["model"] == lrcompile.SiteStats(calls=1, fallbacks=0, largest_error=0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(on_inaccurate="fallback"), "on_inaccurate must be one of"),
    (dict(max_error=-0.1), "max_error must be"),
    (dict(max_error="0.1"), "max_error must be"),
])
def test_bad_guard_arguments_raise_clear_errors(kwargs, message):
    q, k, v = attention_inputs(1, 1, 8, 8, 4, requires_grad=False)
    with pytest.raises(ValueError, match=message):
        lowrank_attention(q, k, v, **kwargs)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_compiled_guard_decides_per_call_without_recompiling():
    """One compiled graph serves accurate and inaccurate inputs: the decision is data-dependent
    inside the custom op, so Dynamo neither breaks the graph nor recompiles."""
    torch._dynamo.reset()
    compiled = torch.compile(Attention(), backend=lrcompile.backend(lrcompile.Policy(degree=4, cost_model=False)))
    narrow = [t.float() for t in attention_inputs(1, 2, 64, 64, 8, score_range=0.2)]
    wide = [t.float() for t in attention_inputs(1, 2, 64, 64, 8, score_range=8.0)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for inputs, accurate in ((narrow, True), (wide, False), (narrow, True)):
            out = compiled(*inputs)
            expected = exact_attention(*inputs, is_causal=True)
            # narrow: degree 4 at range 0.2; wide: exact attention in float32
            assert max_error(out, expected) < (1e-4 if accurate else 1e-5)
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
            wanted = torch.autograd.grad(expected, inputs, torch.ones_like(expected))
            assert max(max_error(a, b) for a, b in zip(grads, wanted)) < (1e-3 if accurate else 1e-4)
    (label, stats), = lrcompile.stats().items()
    assert label.startswith("<root>:") and (stats.calls, stats.fallbacks) == (3, 1)


class NoisyAttention(nn.Module):
    """Wide scores: degree 2 is far from softmax here."""

    def forward(self, x):
        return F.scaled_dot_product_attention(4 * x, 4 * x, x)


def test_explain_shows_measured_error_and_marks_sites_the_guard_sends_to_exact():
    x = torch.randn(1, 2, 32, 8)
    report = lrcompile.explain(NoisyAttention(), x, policy=lrcompile.Policy(cost_model=False))
    (site,) = report.sites
    assert site.rewritten and site.guard_falls_back
    assert site.measured_error > 0.05
    text = str(report)
    assert "REWRITTEN (guard: exact)" in text and "estimate exceeds max_error=0.01" in text
    assert lrcompile.stats() == {}  # explain's own run leaves the user's counters alone

    narrow = lrcompile.explain(NoisyAttention(), x / 40, policy=lrcompile.Policy(cost_model=False, degree=4))
    assert not narrow.sites[0].guard_falls_back and narrow.sites[0].measured_error < 1e-3


# ---------------------------------------------------------------------------------------------
# Trust II (issue P10): what the guard lets through, forward and backward


def _alibi_case(n=512, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (0.3 * torch.randn(1, 1, n, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    bias = 0.5 * (torch.arange(n, dtype=torch.float64) - (n - 1)).view(1, 1, 1, n)  # MPT-style ALiBi, one head
    return [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]


@pytest.mark.parametrize("on_inaccurate", ["exact", "warn", "allow"])
def test_causal_attention_with_a_per_key_bias_is_right_on_every_row_forward_and_backward(on_inaccurate):
    """Early causal rows see only keys e^-255 below the global peak: the factored sweep loses them,
    so the call is exact (with the bias's true weights), whatever on_inaccurate says, and counted."""
    q, k, v, bias = _alibi_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lowrank_attention(q, k, v, attn_mask=bias, is_causal=True, degree=4, on_inaccurate=on_inaccurate,
                                site_label="alibi")
    expected = exact_attention(*(t.double() for t in (q, k, v)), attn_mask=bias.double(), is_causal=True)
    assert torch.isfinite(out).all() and max_error(out, expected) < 1e-5
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v, bias), grad_out.float())
    wanted = torch.autograd.grad(expected, (q, k, v, bias), grad_out)
    for name, a, b in zip("qkvm", got, wanted):
        assert max_error(a, b) < 1e-4, name
    stats = lrcompile.stats()["alibi"]
    assert (stats.calls, stats.fallbacks) == (1, 1) and stats.largest_error == float("inf")


def test_a_nan_estimate_counts_as_inaccurate_and_is_recorded():
    q, k, v = attention_inputs(1, 1, 40, 40, 8, score_range=0.2, requires_grad=False)
    q5, k4, v4 = q.unsqueeze(2), k, v
    nan_out = torch.full((1, 1, 1, 40, 8), float("nan"), dtype=q.dtype)
    assert guard.check("nan", nan_out, q5, k4, v4, None, 8**-0.5, False, 0.01, "exact")
    assert lrcompile.stats()["nan"].largest_error == float("inf") and lrcompile.stats()["nan"].fallbacks == 1


def _guard_metric(out, expected):
    """The guard's metric on every row: ||out_i - exact_i|| / rms_j ||out_j||, per head."""
    scale = out.square().sum(-1).mean(-1, keepdim=True).sqrt()
    return ((out - expected).norm(dim=-1) / scale).max().item()


@pytest.mark.parametrize("causal, n, std", [(True, 2048, 0.6), (False, 1024, 0.8), (True, 512, 0.75)])
def test_what_the_guard_lets_through_is_within_max_error_on_every_row(causal, n, std):
    """The issue's cases: early causal rows (2-8) and wide non-causal scores were missed by the old
    sampling. Either the call fell back, or every row is within max_error."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (std * torch.randn(1, 2, n, 64, generator=generator) for _ in range(3))
    out = lowrank_attention(q, k, v, is_causal=causal, degree=2, on_inaccurate="exact", site_label="s")
    expected = exact_attention(q.double(), k.double(), v.double(), is_causal=causal)
    stats = lrcompile.stats()["s"]
    assert stats.fallbacks == 1 or _guard_metric(out.double(), expected) <= 0.01, stats


def test_sampled_rows_include_early_causal_rows_and_the_widest_reach():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 600, 8, generator=generator)
    k = torch.randn(1, 1, 600, 8, generator=generator)
    k[0, 0, 400] *= 30  # rows 400.. see a key of wide range
    rows = guard.sampled_rows(q, guard.SAMPLED_ROWS, k, None, causal=True).flatten().tolist()
    assert any(row < 8 for row in rows)  # few keys seen
    assert sum(row >= 400 for row in rows) >= guard.SAMPLED_ROWS // 3


def test_a_call_whose_gradients_exceed_max_error_differentiates_exact_attention():
    """Forward estimate ~1e-3, gradient estimate ~1e-2 (d = 64, q/k std 0.3, degree 2): with
    max_error between them the forward keeps the polynomial and the backward goes exact."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(1, 2, 512, 64, generator=generator, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    out = lowrank_attention(q, k, v, degree=2, max_error=0.004, on_inaccurate="exact", site_label="g")
    stats = lrcompile.stats()["g"]
    assert stats.fallbacks == 0 and stats.backward_fallbacks == 0
    expected = exact_attention(q, k, v)
    assert max_error(out, expected) > 1e-6  # the polynomial's output
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    wanted = torch.autograd.grad(expected, (q, k, v), grad_out)
    for a, b in zip(got, wanted):
        assert max_error(a, b) < 1e-10
    stats = lrcompile.stats()["g"]
    assert stats.backward_fallbacks == 1 and stats.largest_backward_error > 0.004


def test_accurate_gradients_keep_the_polynomial_backward():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (0.1 * torch.randn(1, 2, 256, 16, generator=generator, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    out = lowrank_attention(q, k, v, degree=4, on_inaccurate="exact", site_label="g")
    unguarded = lowrank_attention(q, k, v, degree=4)
    grad_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(unguarded, (q, k, v), grad_out)):
        assert torch.equal(a, b)
    stats = lrcompile.stats()["g"]
    assert stats.backward_fallbacks == 0 and 0 < stats.largest_backward_error < 1e-3


class MPTStyleAttention(nn.Module):
    """MPT's spelling: q k^T / sqrt(d) + alibi (1, H, 1, n) per key, then a tril masked_fill."""

    def __init__(self, n, heads=2):
        super().__init__()
        slopes = 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32)
        self.register_buffer("alibi", (slopes[:, None] * (torch.arange(n) - (n - 1)))[None, :, None, :])
        self.register_buffer("causal", torch.ones(n, n, dtype=torch.bool).tril())

    def forward(self, q, k, v):
        n = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + self.alibi[..., :n]
        scores = scores.masked_fill(~self.causal[:n, :n], float("-inf"))
        return scores.softmax(-1) @ v


def test_mpt_style_alibi_site_is_a_causal_key_bias_and_right_forward_and_backward():
    n = 512
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(1, 2, n, 16, generator=generator) for _ in range(3))
    module = MPTStyleAttention(n)
    policy = lrcompile.Policy(cost_model=False, degree=4)
    report = lrcompile.explain(module, q, k, v, policy=policy)
    (site,) = report.sites
    assert site.mask == "causal+key_bias" and site.rewritten
    assert site.measured_error > 0.01 and site.guard_falls_back  # inf where the polynomial's output is NaN, not NaN

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(module, backend=lrcompile.backend(policy))(*inputs)
    reference = [t.double().requires_grad_() for t in (q, k, v)]
    expected = module.double()(*reference)
    assert max_error(out, expected) < 1e-5
    grad_out = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, inputs, grad_out.float()), torch.autograd.grad(expected, reference, grad_out)):
        assert max_error(a, b) < 1e-4
    (stats,) = lrcompile.stats().values()
    assert stats.fallbacks == 1 and stats.largest_error == float("inf")


def test_the_guard_op_of_the_triton_path_checks_gradients_too():
    """lrcompile::guarded_output (what the Triton op's caller runs) with the polynomial's
    coefficients: an accurate forward whose gradients exceed max_error differentiates exact attention."""
    from lrcompile.reference import polynomial_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(1, 2, 1, 256, 64, generator=generator, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, 0], v[:, :, 0]
    leaves = [t.requires_grad_() for t in (q, k, v)]
    coefficients = [1.0, 1.0, 0.5]
    approx = polynomial_attention(q[:, :, 0], k - k.mean(-2, keepdim=True), v, coefficients, scale=0.125).unsqueeze(2)
    out, exact = guard.guarded_output(approx, q, k, v, None, 0.125, False, 0.004, "exact", "triton", coefficients)
    assert not exact.item()
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, grad_out)
    expected = guard.exact_attention(q, k, v, None, 0.125, False)
    wanted = torch.autograd.grad(expected, leaves, grad_out)
    for a, b in zip(got, wanted):
        assert max_error(a, b) < 1e-10
    assert lrcompile.stats()["triton"].backward_fallbacks == 1


def test_the_guard_op_of_the_triton_path_returns_exact_attention_with_the_bias_true_weights():
    """The Triton op's caller passes the causal bias's log weights too: where they underflow
    (float32, a range of 127), its exact fallback, forward and the bias's gradient, uses them and
    not the key weights, which are 0 for the early rows' keys."""
    q, k, v, bias = _alibi_case(n=256, dtype=torch.float32)
    log_weight = bias[:, :, 0] - bias.amax()  # (1, 1, n)
    key_weight = log_weight.exp()
    q5 = q.unsqueeze(2)
    garbage = torch.zeros(q5.shape[:-1] + (v.shape[-1],))  # what the underflowed rows hold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, exact = guard.guarded_output(garbage, q5, k, v, key_weight, 0.25, True, 0.01, "exact", "t", None,
                                          log_weight)
    assert exact.item() and lrcompile.stats()["t"].largest_error == float("inf")
    reference = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    expected = exact_attention(*reference[:3], attn_mask=reference[3], is_causal=True)
    assert max_error(out[:, :, 0], expected) < 1e-5
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out[:, :, 0], (q, k, v, bias), grad_out.float())
    wanted = torch.autograd.grad(expected, reference, grad_out)
    for name, a, b in zip("qkvm", got, wanted):
        assert max_error(a, b) < 1e-4, name


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -1e9], ids=["finfo_min", "minus_1e9"])
def test_left_padded_causal_rows_under_a_finite_mask_do_not_send_the_call_to_exact(fill):
    """transformers' eager spelling pads with a finite fill: the first rows of a left-padded sequence
    then see only keys of weight e^{m - peak} = 0. The kernels return 0 there and lowrank_attention
    gives those rows the average of their visible keys, as exact attention does; the guard used to
    measure the kernels' 0 (an error of 3) and return exact attention for every such batch. The loss
    reads the token rows only, as training does (the padded rows' q gets softmax's gradient through
    rounded-away scores in exact attention, none here)."""
    generator = torch.Generator().manual_seed(21)
    q, k, v = (0.1 * torch.randn(2, 2, 64, 16, generator=generator) for _ in range(3))  # scores within 0.2
    mask = torch.zeros(2, 1, 1, 64)
    mask[1, ..., :5] = fill
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    tokens = (mask[:, 0, 0] == 0)[:, None, :, None]  # (B, 1, n, 1)
    out = lowrank_attention(*leaves, attn_mask=mask, is_causal=True, degree=4, on_inaccurate="error",
                            site_label="left_padded")
    (out * tokens).square().sum().backward()
    stats = lrcompile.stats()["left_padded"]
    assert stats.fallbacks == 0 and stats.largest_error < 1e-4 and stats.backward_fallbacks == 0
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    exact = exact_attention(*exact_leaves, attn_mask=mask.double(), is_causal=True)
    (exact * tokens).square().sum().backward()
    assert ((out - exact) * tokens).abs().max() < 1e-5
    # a padded row i averages the values of keys 0..i, as float32 softmax does once x + m rounds x away
    average = v[1].cumsum(-2)[:, :5] / torch.arange(1, 6)[:, None]
    assert (out[1, :, :5] - average).abs().max() < 1e-6
    for leaf, exact_leaf in zip(leaves, exact_leaves):
        assert (leaf.grad - exact_leaf.grad).abs().max() < 1e-4 * exact_leaf.grad.abs().max()
