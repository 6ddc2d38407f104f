"""Property tests of the accuracy guard (docs/design.md §3, "approximate softmax"; issue P10).

Under Policy(on_inaccurate="exact") every result must be within max_error of exact attention, its
output and its gradients alike, or have been sent to exact attention; and lrcompile.stats() must
say which. Generated over:

- bias kinds: none, ALiBi per key ((1, H, 1, n), MPT's spelling), ALiBi per query-key (relative
  distance, (H, n, n): kept exact), a learned per-key bias (a parameter that trains);
- sliding windows of generated widths, called at several lengths (recompiles: automatic dynamic);
- score ranges: q/k std 0.3 to 1.5; causal and not; degrees 2 and 4;
- n from 16 to 4096: most examples small, the largest as explicit examples.

Most examples call the op directly (`lowrank_attention`, a fraction of a second each); a smaller set
compiles modules with the backend (AOTAutograd with eager kernels, so the backward op runs as it
does under Inductor). Examples are derandomized, so CI sees the same ones every run.

Metrics, against float64 SDPA: the output by the guard's own (lrcompile.ops.guard.relative_error, every
row); a gradient by its relative Frobenius error. The guard estimates from sampled rows, so the
true value over every row may exceed the estimate a little: SLACK x max_error is allowed.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import lrcompile
from lrcompile.compile.backend import compile_graph
from lrcompile.ops import guard

MAX_ERROR = 0.01
SLACK = 2.0
# Below this an output or gradient differs from exact attention by rounding only: an exact fallback.
EXACT = 1e-4
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
BIASES = ("none", "alibi_key", "learned")


@pytest.fixture(autouse=True)
def _fresh_counters():
    lrcompile.reset_stats()
    yield
    lrcompile.reset_stats()


def _relative(a, b) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _output_error(out, exact, v) -> float:
    """lrcompile.guard.relative_error on every row, in SDPA's layout (B, H, n, d_v)."""
    return guard.relative_error(out.double().unsqueeze(2), exact.unsqueeze(2), v.double())


def _alibi_slopes(heads):
    return 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float64)


def _bias(kind, heads, n, generator):
    """A per-key float mask (1, H, 1, n), or None."""
    if kind == "alibi_key":
        return (_alibi_slopes(heads)[:, None] * (torch.arange(n) - (n - 1)))[None, :, None, :]
    if kind == "learned":
        return 0.5 * torch.randn(1, heads, 1, n, generator=generator, dtype=torch.float64)
    return None


def _reference(q, k, v, bias, causal):
    n = q.shape[-2]
    mask = bias
    if causal:
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        mask = tril if bias is None else bias.masked_fill(~tril, -math.inf)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# The op, directly


@settings(max_examples=272, **SETTINGS)
@given(n=st.integers(16, 200), head_dim=st.sampled_from([8, 16]), std=st.floats(0.3, 1.5),
       causal=st.booleans(), bias=st.sampled_from(BIASES), degree=st.sampled_from([2, 4]),
       seed=st.integers(0, 2**16))
@example(n=4096, head_dim=16, std=0.3, causal=True, bias="alibi_key", degree=2, seed=1)
@example(n=2048, head_dim=16, std=0.4, causal=False, bias="none", degree=2, seed=2)
@example(n=1024, head_dim=16, std=0.6, causal=True, bias="learned", degree=4, seed=3)
@example(n=2048, head_dim=8, std=0.35, causal=True, bias="none", degree=2, seed=4)
def test_the_op_under_exact_is_within_max_error_or_exact_forward_and_backward(n, head_dim, std, causal, bias,
                                                                               degree, seed):
    lrcompile.reset_stats()
    generator = torch.Generator().manual_seed(seed)
    heads = 2
    q, k = (std * torch.randn(1, heads, n, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, heads, n, head_dim, generator=generator, dtype=torch.float64)
    mask = _bias(bias, heads, n, generator)
    leaves64 = [q, k, v] + ([mask] if bias == "learned" else [])
    leaves64 = [t.requires_grad_() for t in leaves64]
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    q32, k32, v32 = leaves[:3]
    mask32 = leaves[3] if bias == "learned" else (None if mask is None else mask.float())

    out = lrcompile.lowrank_attention(q32, k32, v32, attn_mask=mask32, is_causal=causal, degree=degree,
                                      max_error=MAX_ERROR, on_inaccurate="exact", site_label="op")
    exact = _reference(q, k, v, mask if bias != "learned" else leaves64[3], causal)
    grad_out = torch.randn(exact.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, grad_out.float())
    wanted = torch.autograd.grad(exact, leaves64, grad_out)

    stats = lrcompile.stats()["op"]
    output_error = _output_error(out, exact.detach(), v)
    gradient_error = max(_relative(a, b) for a, b in zip(got, wanted))
    note(f"stats {stats}; output error {output_error:.3g}; gradient error {gradient_error:.3g}")
    assert stats.calls == 1
    if stats.fallbacks:  # exact attention, forward and backward
        assert stats.largest_error > MAX_ERROR
        assert output_error < EXACT and gradient_error < EXACT
        return
    assert stats.largest_error <= MAX_ERROR
    assert output_error <= SLACK * MAX_ERROR
    if stats.backward_fallbacks:
        assert stats.largest_backward_error > MAX_ERROR and gradient_error < EXACT
    else:
        assert stats.largest_backward_error <= MAX_ERROR and gradient_error <= SLACK * MAX_ERROR


# ---------------------------------------------------------------------------------------------
# Compiled modules, across recompiles


class Attention(nn.Module):
    """Explicit attention with a generated bias and mask; lengths up to `longest`."""

    def __init__(self, bias: str, window: int | None, causal: bool, heads: int, longest: int):
        super().__init__()
        self.bias_kind, self.window, self.causal = bias, window, causal
        slopes = _alibi_slopes(heads).float()
        positions = torch.arange(longest)
        self.register_buffer("alibi", (slopes[:, None] * (positions - (longest - 1)))[None, :, None, :])
        self.register_buffer("slopes", slopes[None, :, None, None])
        self.learned = nn.Parameter(0.5 * torch.randn(1, heads, 1, longest))

    def forward(self, q, k, v):
        n = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if self.bias_kind == "alibi_key":
            scores = scores + self.alibi[..., -n:]
        elif self.bias_kind == "alibi_query_key":
            positions = torch.arange(n)
            scores = scores - self.slopes * (positions[:, None] - positions[None, :]).abs()
        elif self.bias_kind == "learned":
            scores = scores + self.learned[..., :n]
        if self.causal or self.window is not None:
            positions = torch.arange(n)
            distance = positions[:, None] - positions[None, :]
            keep = distance >= 0
            if self.window is not None:
                keep = keep & (distance < self.window)
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v


def _module_reference(module):
    heads, longest = module.learned.shape[1], module.learned.shape[-1]
    reference = Attention(module.bias_kind, module.window, module.causal, heads, longest)
    reference.load_state_dict(module.state_dict())
    return reference.double()


@settings(max_examples=30, **SETTINGS)
@given(bias=st.sampled_from(BIASES + ("alibi_query_key",)), window=st.one_of(st.none(), st.integers(4, 120)),
       causal=st.booleans(), std=st.floats(0.3, 1.5), degree=st.sampled_from([2, 4]),
       lengths=st.lists(st.integers(16, 160), min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_compiled_modules_under_exact_are_within_max_error_or_exact_across_recompiles(bias, window, causal, std,
                                                                                      degree, lengths, seed):
    torch._dynamo.reset()
    lrcompile.reset_stats()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads, head_dim = 2, 16
    module = Attention(bias, window, causal, heads, longest=max(lengths))
    policy = lrcompile.Policy(cost_model=False, degree=degree, max_error=MAX_ERROR, on_inaccurate="exact")
    compiled = torch.compile(module, backend=lambda gm, inputs: compile_graph(gm, inputs, policy, inner=aot_eager))
    reference = _module_reference(module)
    for n in lengths:
        before = {site: (s.calls, s.fallbacks, s.backward_fallbacks) for site, s in lrcompile.stats().items()}
        q, k = (std * torch.randn(1, heads, n, head_dim, generator=generator) for _ in range(2))
        v = torch.randn(1, heads, n, head_dim, generator=generator)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compiled(*leaves)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        exact = reference(*leaves64)
        grad_out = torch.randn(exact.shape, generator=generator, dtype=torch.float64)
        params, params64 = [module.learned], [reference.learned]
        got = torch.autograd.grad(out, leaves + params, grad_out.float(), allow_unused=True)
        wanted = torch.autograd.grad(exact, leaves64 + params64, grad_out, allow_unused=True)
        pairs = [(a, b) for a, b in zip(got, wanted) if b is not None]  # the bias parameter only where used
        assert all(a is not None for a, _ in pairs)

        now = lrcompile.stats()
        calls = {site: (s.calls, s.fallbacks, s.backward_fallbacks) for site, s in now.items()}
        delta = [tuple(c - p for c, p in zip(calls[site], before.get(site, (0, 0, 0)))) for site in calls]
        fallbacks = sum(d[1] for d in delta)
        backward_fallbacks = sum(d[2] for d in delta)
        output_error = _output_error(out, exact.detach(), leaves64[2])
        gradient_error = max(_relative(a, b) for a, b in pairs if b.norm() > 0)
        note(f"n={n}: calls {delta}, output error {output_error:.3g}, gradient error {gradient_error:.3g}")
        if not delta or all(d[0] == 0 for d in delta):  # the site was kept exact
            assert output_error < EXACT and gradient_error < EXACT
            continue
        assert sum(d[0] for d in delta) == 1
        if fallbacks:
            assert output_error < EXACT and gradient_error < EXACT
            continue
        assert output_error <= SLACK * MAX_ERROR
        assert gradient_error < EXACT if backward_fallbacks else gradient_error <= SLACK * MAX_ERROR
