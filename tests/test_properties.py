"""Property tests of the backend over generated attention modules (docs/design.md sections 3 and 4).

Each example is a module spelled from independent choices -- how Q Kᵀ is multiplied (matmul, @,
bmm, einsum, SDPA), how the keys are transposed, where the scale goes, how softmax is called, how
a causal or key-padding mask is written, how key/value heads are repeated -- with inputs whose
sequence length, dtype and score range are drawn too, including left padding (query rows that
see no key at all). It is compiled with the lrcompile backend and run once. What must hold:

- compiling and running never raises, and the backend never falls back with a warning;
- no NaN where the eager module (exact attention) has none;
- a rewritten site computes the polynomial attention of its degree (lrcompile.reference, quadratic,
  float64) up to rounding -- or, when the accuracy guard fired for that call, exact attention;
- with the accuracy guard (Policy(max_error=..., on_inaccurate="exact")), every output is within
  max_error of exact attention in the guard's metric, or the call fell back to exact attention;
- a kept site carries a reason, and leaves the output exact.

Most examples run the rewritten Dynamo graph eagerly (`compile_graph(..., inner=eager)`): Dynamo
and the rewrite are what is under test there, and that costs about 0.1 s an example. A smaller
set runs the same modules through Inductor. Examples are derandomized, so CI sees the same ones
every run; `pytest --hypothesis-seed=N -p no:randomly` with derandomize off explores further.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import lrcompile
from attention_corpus import CASES, repeat_kv
from lrcompile.compile.backend import compile_graph
from lrcompile.reference import polynomial_attention

LONGEST = 320  # causal buffers are sliced from this size, as nanoGPT's are
GUARD = hasattr(lrcompile, "stats") and "on_inaccurate" in getattr(lrcompile.Policy, "__dataclass_fields__", {})
needs_guard = pytest.mark.skipif(not GUARD, reason="the accuracy guard API (Policy.on_inaccurate, lrcompile.stats) "
                                                   "is not in this build")
MAX_ERROR = 0.01


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are small: one thread avoids OpenMP barriers dominating every op on a busy 2-core
    machine (60 ms for a 12 x 12 matmul under contention), and exercises the single-thread kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The spellings, as data: one module class interprets them.


@dataclass(frozen=True)
class Spelling:
    product: str          # matmul | operator | bmm | einsum | sdpa
    key_transpose: str    # transpose | transpose_positive | permute | mT   (not used by einsum/sdpa)
    scale: str            # multiply | divide | buffer | queries | none   (sdpa: default | keyword)
    softmax: str          # function | method | torch | module | upcast
    causal: str           # none | bool_buffer | float_buffer | where_positions | additive_buffer | is_causal
    padding: str          # none | masked_fill | masked_fill_eq | masked_fill_large | where | additive_large | additive_finfo |
                          # additive_inf   (sdpa: none | bool | additive_inf | additive_large)
    heads: str            # same | repeat_interleave | expand | broadcast | enable_gqa
    positional: bool = False  # sdpa: attn_mask, dropout_p, is_causal passed by position


@dataclass(frozen=True)
class Example:
    spelling: Spelling
    dtype: torch.dtype
    n: int
    head_dim: int
    scale_value: float    # the softmax scale s of explicit spellings (and of sdpa's "keyword")
    magnitude: float      # q and k entries are N(0, magnitude^2): scores ~ s magnitude^2 sqrt(d)
    padded: str           # none | right | left | whole_sequence (batch element 1)
    degree: int
    seed: int

    @property
    def query_heads(self):
        return 4 if self.spelling.heads != "same" else 2

    @property
    def kv_heads(self):
        return {"same": 2, "broadcast": 1}.get(self.spelling.heads, 2)

    @property
    def effective_scale(self):
        s = self.spelling
        if s.product == "sdpa":
            return self.scale_value if s.scale == "keyword" else 1 / math.sqrt(self.head_dim)
        return 1.0 if s.scale == "none" else self.scale_value

    @property
    def has_padding(self):
        return self.spelling.padding != "none"


class Spelled(nn.Module):
    """Attention over given q (B, Hq, n, d), k, v (B, Hk, n, d) and a keep mask (B, n), written
    the way `spelling` says."""

    def __init__(self, spelling: Spelling, scale_value: float, dtype: torch.dtype):
        super().__init__()
        self.spelling, self.scale_value = spelling, scale_value
        self.softmax_module = nn.Softmax(dim=-1)
        self.register_buffer("scale_buffer", torch.tensor(scale_value, dtype=dtype))
        self.register_buffer("causal_bool", torch.ones(LONGEST, LONGEST, dtype=torch.bool).tril())
        self.register_buffer("causal_float", torch.tril(torch.ones(LONGEST, LONGEST)).view(1, 1, LONGEST, LONGEST))
        self.register_buffer("causal_additive", torch.full((LONGEST, LONGEST), float("-inf"), dtype=dtype).triu(1))

    def forward(self, q, k, v, keep):
        s = self.spelling
        if s.heads == "repeat_interleave":
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=-3)
        elif s.heads == "expand":
            groups = q.shape[1] // k.shape[1]
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        if s.product == "sdpa":
            return self.sdpa(q, k, v, keep)
        if s.scale == "queries":
            q = q * self.scale_value
        B, H, n, _ = q.shape
        scores = self.product(q, k)  # (B, H, n, n); bmm: (B H, n, n)
        if s.scale == "multiply":
            scores = scores * self.scale_value
        elif s.scale == "divide":
            scores = scores / (1.0 / self.scale_value)
        elif s.scale == "buffer":
            scores = scores * self.scale_buffer
        if s.causal != "none" or s.padding != "none":
            if s.product == "bmm":  # BART's eager attention: masks added in (B, H, n, n), softmax in (B H, n, n)
                scores = scores.view(B, H, n, n)
            scores = self.padding_mask(self.causal_mask(scores), keep)
            if s.product == "bmm":
                scores = scores.view(B * H, n, n)
        weights = self.softmax(scores, q.dtype)
        return self.weighted(weights, v, B, H)

    def product(self, q, k):
        s = self.spelling
        if s.product == "einsum":
            return torch.einsum("bhqd,bhkd->bhqk", q, k)
        transposed = {"transpose": lambda: k.transpose(-2, -1), "transpose_positive": lambda: k.transpose(2, 3),
                      "permute": lambda: k.permute(0, 1, 3, 2), "mT": lambda: k.mT}[s.key_transpose]()
        if s.product == "matmul":
            return torch.matmul(q, transposed)
        if s.product == "operator":
            return q @ transposed
        B, H, n, d = q.shape
        return torch.bmm(q.reshape(B * H, n, d), transposed.reshape(B * H, d, -1))

    def weighted(self, weights, v, B, H):
        s = self.spelling
        if s.product == "einsum":
            return torch.einsum("bhqk,bhkd->bhqd", weights, v)
        if s.product == "matmul":
            return torch.matmul(weights, v)
        if s.product == "operator":
            return weights @ v
        return torch.bmm(weights, v.reshape(B * H, v.shape[-2], -1)).view(B, H, weights.shape[-2], -1)

    def causal_mask(self, scores):
        kind, n = self.spelling.causal, scores.shape[-1]
        if kind == "bool_buffer":
            return scores.masked_fill(~self.causal_bool[:n, :n], float("-inf"))
        if kind == "float_buffer":  # nanoGPT
            return scores.masked_fill(self.causal_float[:, :, :n, :n] == 0, float("-inf"))
        if kind == "where_positions":
            positions = torch.arange(n, device=scores.device)
            return torch.where(positions[None, :] <= positions[:, None], scores, float("-inf"))
        if kind == "additive_buffer":
            return scores + self.causal_additive[:n, :n]
        return scores

    def padding_mask(self, scores, keep):
        kind = self.spelling.padding
        attend = keep[:, None, None, :]
        if kind == "masked_fill":
            return scores.masked_fill(~attend, float("-inf"))
        if kind == "masked_fill_eq":
            return scores.masked_fill(attend == 0, float("-inf"))
        if kind == "where":
            return torch.where(attend, scores, float("-inf"))
        if kind == "masked_fill_large":  # a finite fill, as many models write it
            return scores.masked_fill(~attend, -1e9)
        if kind == "additive_large":  # BERT
            return scores + (1.0 - attend.to(scores.dtype)) * -1e9
        if kind == "additive_finfo":  # transformers' masks
            return scores + torch.zeros_like(attend, dtype=scores.dtype).masked_fill(~attend, torch.finfo(scores.dtype).min)
        if kind == "additive_inf":
            return scores + torch.zeros_like(attend, dtype=scores.dtype).masked_fill(~attend, float("-inf"))
        return scores

    def softmax(self, scores, dtype):
        kind = self.spelling.softmax
        if kind == "function":
            return F.softmax(scores, dim=-1)
        if kind == "method":
            return scores.softmax(-1)
        if kind == "torch":
            return torch.softmax(scores, dim=-1)
        if kind == "module":
            return self.softmax_module(scores)
        return F.softmax(scores, dim=-1, dtype=torch.float64).to(dtype)  # llama-style upcast

    def sdpa(self, q, k, v, keep):
        s = self.spelling
        attend = keep[:, None, None, :]
        mask = {"none": None, "bool": attend,
                "additive_inf": torch.zeros_like(attend, dtype=q.dtype).masked_fill(~attend, float("-inf")),
                "additive_large": (1.0 - attend.to(q.dtype)) * -1e9}[s.padding]
        causal = s.causal == "is_causal"
        gqa = s.heads == "enable_gqa"
        if s.positional:
            return F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)
        if s.scale == "keyword":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale_value,
                                                  enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# Strategies


@st.composite
def explicit_spellings(draw):
    product = draw(st.sampled_from(["matmul", "operator", "bmm", "einsum"]))
    heads = draw(st.sampled_from(["same", "repeat_interleave", "expand"]
                                 + (["broadcast"] if product in ("matmul", "operator") else [])))
    return Spelling(
        product=product,
        key_transpose=draw(st.sampled_from(["transpose", "transpose_positive", "permute", "mT"])),
        scale=draw(st.sampled_from(["multiply", "divide", "buffer", "queries", "none"])),
        softmax=draw(st.sampled_from(["function", "method", "torch", "module", "upcast"])),
        causal=draw(st.sampled_from(["none", "bool_buffer", "float_buffer", "where_positions", "additive_buffer"])),
        padding=draw(st.sampled_from(["none", "masked_fill", "masked_fill_eq", "masked_fill_large", "where", "additive_large",
                                      "additive_finfo", "additive_inf"])),
        heads=heads,
    )


@st.composite
def sdpa_spellings(draw):
    positional = draw(st.booleans())
    causal = draw(st.sampled_from(["none", "is_causal"]))
    return Spelling(
        product="sdpa", key_transpose="transpose",
        scale="default" if positional else draw(st.sampled_from(["default", "keyword"])),
        softmax="function", causal=causal,
        padding=draw(st.sampled_from(["none", "bool", "additive_inf", "additive_large"])),
        heads="same" if positional else draw(st.sampled_from(["same", "enable_gqa", "repeat_interleave"])),
        positional=positional,
    )


@st.composite
def examples(draw, spellings=st.one_of(explicit_spellings(), sdpa_spellings()), longest=300):
    spelling = draw(spellings)
    head_dim = draw(st.sampled_from([4, 8, 16]))
    return Example(
        spelling=spelling,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        n=draw(st.one_of(st.integers(1, 24), st.integers(25, longest))),
        head_dim=head_dim,
        scale_value=draw(st.sampled_from([head_dim ** -0.5, 0.125, 0.5])),
        magnitude=draw(st.sampled_from([0.05, 0.3, 1.0, 2.0])),  # score ranges from ~0.01 to ~30
        padded=draw(st.sampled_from(["right", "left", "whole_sequence"])) if spelling.padding != "none" else "none",
        degree=draw(st.sampled_from([2, 4])),
        seed=draw(st.integers(0, 2**16)),
    )


def inputs_of(example: Example, dtype=None):
    dtype = dtype or example.dtype
    generator = torch.Generator().manual_seed(example.seed)
    B, n, d = 2, example.n, example.head_dim

    def draw(heads):
        return torch.randn(B, heads, n, d, generator=generator, dtype=torch.float64)

    q, k, v = draw(example.query_heads) * example.magnitude, draw(example.kv_heads) * example.magnitude, draw(example.kv_heads)
    keep = torch.ones(B, n, dtype=torch.bool)
    padded = math.ceil(n / 3)
    if example.padded == "right":
        keep[1, n - padded:] = False
    elif example.padded == "left":
        keep[1, :padded] = False
    elif example.padded == "whole_sequence":
        keep[1] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), keep


# ---------------------------------------------------------------------------------------------
# Running an example


@dataclass
class Outcome:
    out: torch.Tensor
    decisions: list          # (AttentionSite, Decision) of every graph
    warnings: list
    fallbacks: int           # calls the accuracy guard answered with exact attention (0 without a guard)
    largest_error: float     # the guard's largest estimate (nan without a guard)


def policy_for(example: Example, **overrides):
    return lrcompile.Policy(cost_model=False, degree=example.degree, **overrides)


def compile_and_run(example: Example, policy, inductor: bool = False) -> Outcome:
    module = Spelled(example.spelling, example.scale_value, example.dtype)
    decisions = []

    def backend(gm, example_inputs):
        inner = None if inductor else (lambda graph, _inputs: graph.forward)
        return compile_graph(gm, example_inputs, policy, inner=inner,
                             on_rewrite=lambda rewrite: decisions.extend(rewrite.decisions))

    torch._dynamo.reset()
    if GUARD:
        lrcompile.reset_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(module, backend=backend, dynamic=False)
        with torch.no_grad():
            out = compiled(*inputs_of(example))
    fallbacks, largest = 0, math.nan
    if GUARD:
        stats = lrcompile.stats()
        fallbacks = sum(s.fallbacks for s in stats.values())
        largest = max((s.largest_error for s in stats.values()), default=math.nan)
    ours = [str(w.message) for w in caught if str(w.message).startswith("lrcompile")]
    return Outcome(out, decisions, ours, fallbacks, largest)


def exact_of(example: Example) -> torch.Tensor:
    """The eager module in float64: exact attention in the spelling's own semantics (SDPA returns 0
    for a query that sees no key, explicit softmax NaN)."""
    module = Spelled(example.spelling, example.scale_value, torch.float64)
    with torch.no_grad():
        return module(*inputs_of(example, torch.float64))


def eager_of(example: Example) -> torch.Tensor:
    module = Spelled(example.spelling, example.scale_value, example.dtype)
    with torch.no_grad():
        return module(*inputs_of(example))


def polynomial_of(example: Example) -> torch.Tensor:
    """What a rewritten site computes: the degree-g Taylor attention, quadratic, float64."""
    q, k, v, keep = inputs_of(example, torch.float64)
    s = example.spelling
    if s.heads in ("repeat_interleave", "expand", "broadcast"):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    mask = None
    if s.padding != "none":
        mask = keep[:, None, None, :]
        if s.padding in ("additive_large", "additive_finfo"):
            # A removed key has weight exp(mask) = 0, as in the op (which also shifts every row by its
            # largest mask value: that differs only in a batch element with no key kept).
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    coefficients = [1 / math.factorial(m) for m in range(example.degree + 1)]
    causal = s.causal != "none"
    return polynomial_attention(q, k, v, coefficients, attn_mask=mask, is_causal=causal,
                                scale=example.effective_scale, enable_gqa=s.heads == "enable_gqa")


def row_errors(out, reference, v) -> torch.Tensor:
    """The guard's metric (lrcompile.ops.guard.relative_error) per query row: max |out - reference| over
    the row / max |v| over the row's key/value head."""
    v = v.double().repeat_interleave(out.shape[1] // v.shape[1], dim=1)  # (B, Hq, n, d_v)
    return (out.double() - reference).abs().amax(-1) / v.abs().amax((-2, -1)).clamp_min(1e-30)[..., None]


def guard_row_errors(out, reference, v) -> torch.Tensor:
    """The guard's metric (lrcompile.ops.guard.relative_error) per query row: ||out_i - reference_i|| over
    the rms row norm of the head's whole output (floored at 1e-6 of the largest reference row)."""
    out = out.double()
    scale = out.square().sum(-1).mean(-1).sqrt()  # (B, Hq)
    scale = torch.maximum(scale, 1e-6 * reference.norm(dim=-1).nan_to_num(0.0).amax(-1)).clamp_min(1e-30)
    return (out - reference).norm(dim=-1) / scale[..., None]


def rounding(example: Example) -> float:
    return 1e-9 if example.dtype == torch.float64 else 1e-4


# Query rows that see no kept key: once product bugs (the regression tests at the end pin them).
def rows_seeing_no_key(example: Example) -> torch.Tensor:
    """(B, n) True where a query row sees no kept key (through padding, and causality)."""
    keep = inputs_of(example)[3]
    seen = keep[:, None, :].expand(-1, example.n, -1)
    if example.spelling.causal != "none":
        seen = seen & torch.ones(example.n, example.n, dtype=torch.bool).tril()
    return ~seen.any(-1)


def documented_difference(example: Example) -> bool:
    """The documented differences (README, "The op") of a causal row that sees no kept key under a
    finite mask: the rewrite averages its visible keys. The original graph's answer depends on the
    order of its fills (a padding fill written after the causal one re-opens the future keys), and
    on whether -1e9 + score rounds the score away (float32) or not (float64)."""
    finite = ("additive_finfo", "masked_fill_large", "additive_large")
    return (example.spelling.causal != "none" and example.spelling.padding in finite
            and bool(rows_seeing_no_key(example).any()))



# ---------------------------------------------------------------------------------------------
# The properties


def check(example: Example, outcome: Outcome, on_inaccurate: str | None):
    assert not outcome.warnings, outcome.warnings
    assert outcome.decisions, "no attention site was found"
    exact = exact_of(example)
    q, k, v, keep = inputs_of(example, torch.float64)
    out = outcome.out
    assert out.shape == exact.shape and out.dtype == example.dtype

    new_nan = out.isnan() & ~exact.isnan()
    assert not new_nan.any(), f"NaN in {int(new_nan.any(-1).sum())} rows where exact attention has none"
    comparable = ~exact.isnan().any(-1)  # rows exact attention can answer

    rewritten = [decision for _, decision in outcome.decisions if decision.rewrite]
    kept = [decision for _, decision in outcome.decisions if not decision.rewrite]
    for decision in kept:
        assert decision.reason, "a kept site must say why"
    eager = eager_of(example)  # exact attention as the module computes it in its own dtype
    same_as_eager = ~eager.isnan().any(-1)
    if not rewritten:
        errors = row_errors(out, eager.double(), v)[same_as_eager]
        assert errors.numel() == 0 or errors.max() <= rounding(example)
        return

    if outcome.fallbacks == 0:
        polynomial = polynomial_of(example)
        valid = comparable & ~polynomial.isnan().any(-1)
        errors = row_errors(out, polynomial, v)[valid]
        # float32 rounding grows with the polynomial's values: P(x) ~ x^g / g! at wide ranges
        assert errors.numel() == 0 or errors.max() <= rounding(example) * (1 + outcome_range(example)) ** example.degree, \
            f"output differs from the degree-{example.degree} polynomial attention by {errors.max():.3g}"
    else:
        # Exact attention as the module computes it, or in float64: they differ where rounding is the
        # model's (-1e9 + score keeps the score to 1e-7 in float64, and loses it in float32).
        errors = torch.minimum(row_errors(out, eager.double(), v).nan_to_num(math.inf),
                               row_errors(out, exact, v).nan_to_num(math.inf))[same_as_eager & comparable]
        assert errors.numel() == 0 or errors.max() <= max(rounding(example), 1e-6), \
            "a fallback call must return exact attention"

    if GUARD and outcome.fallbacks == 0 and not exact.isnan().any():
        # The estimate is the same metric on a subset of the rows: it cannot exceed the whole
        # output's error (beyond rounding: of its exact rows in the compute dtype, and of our float64
        # eager reference, where -1e9 + score keeps the score to 1e-7).
        measured = torch.minimum(guard_row_errors(out, exact, v),
                                 guard_row_errors(out, eager.double(), v)).nan_to_num(math.inf).max().item()
        assert outcome.largest_error <= measured * 1.01 + max(10 * rounding(example), 1e-6), \
            (outcome.largest_error, measured)
    if GUARD and on_inaccurate == "exact":
        event("fell back" if outcome.fallbacks else "within max_error" if rewritten else "kept")
        errors = torch.minimum(guard_row_errors(out, exact, v), guard_row_errors(out, eager.double(), v))[comparable]
        # The guard estimates from sampled rows (chosen by a per-row bound), so the true worst
        # row may exceed its estimate a little: allow twice max_error, plus rounding.
        assert errors.numel() == 0 or outcome.fallbacks > 0 or errors.max() <= 2 * MAX_ERROR + rounding(example), \
            f"error {errors.max():.3g} above max_error {MAX_ERROR} and the guard did not fall back " \
            f"(largest estimate {outcome.largest_error:.3g})"


def outcome_range(example: Example) -> float:
    return example.effective_scale * example.magnitude ** 2 * example.head_dim * 3


PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
                         print_blob=True)


@settings(max_examples=250, **PROPERTY_SETTINGS)
@given(examples())
def test_every_spelling_compiles_to_polynomial_or_exact_attention_without_new_nans(example):
    assume(not documented_difference(example))
    policy = policy_for(example, max_error=MAX_ERROR) if GUARD else policy_for(example)
    check(example, compile_and_run(example, policy), "exact" if GUARD else None)


@needs_guard
@settings(max_examples=60, **PROPERTY_SETTINGS)
@given(examples())
def test_under_on_inaccurate_allow_a_rewritten_site_is_always_the_polynomial(example):
    assume(not documented_difference(example))
    outcome = compile_and_run(example, policy_for(example, on_inaccurate="allow"))
    assert outcome.fallbacks == 0
    check(example, outcome, "allow")


@settings(max_examples=10, **PROPERTY_SETTINGS)
@given(examples(longest=96))
def test_inductor_compiles_every_spelling_to_polynomial_or_exact_attention(example):
    assume(not documented_difference(example))
    policy = policy_for(example, max_error=MAX_ERROR) if GUARD else policy_for(example)
    check(example, compile_and_run(example, policy, inductor=True), "exact" if GUARD else None)


SUPPORTED_CASES = [case for case in CASES if case.expected.supported and all(case.expected.supported)]


@settings(max_examples=40, **PROPERTY_SETTINGS)
@given(case=st.sampled_from(SUPPORTED_CASES), magnitude=st.sampled_from([0.3, 1.0, 3.0, 10.0]),
       degree=st.sampled_from([2, 4]))
def test_corpus_models_at_wide_score_ranges_never_gain_nans(case, magnitude, degree):
    """The corpus spellings (projections, einsum layouts, two layers) with inputs scaled up, so
    that scores leave the range where degree 2 is accurate."""
    note(case.name)
    module, inputs = case.build()
    inputs = tuple(x * magnitude if x.is_floating_point() else x for x in inputs)
    decisions = []
    policy = lrcompile.Policy(cost_model=False, degree=degree, **({"max_error": MAX_ERROR} if GUARD else {}))

    def backend(gm, example_inputs):
        return compile_graph(gm, example_inputs, policy, inner=lambda graph, _inputs: graph.forward,
                             on_rewrite=lambda rewrite: decisions.extend(rewrite.decisions))

    torch._dynamo.reset()
    if GUARD:
        lrcompile.reset_stats()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(module, backend=backend, dynamic=False)(*inputs)
        exact = module(*inputs)
    assert not [w for w in caught if str(w.message).startswith("lrcompile")]
    assert decisions and all(decision.rewrite for _, decision in decisions)
    assert not (out.isnan() & ~exact.isnan()).any()
    if GUARD and sum(s.fallbacks for s in lrcompile.stats().values()) == len(decisions):
        torch.testing.assert_close(out, exact)


# ---------------------------------------------------------------------------------------------
# Product bugs found by the properties above, pinned as single examples.

# The polynomial is the model (training): no guard stands between the kernel's NaN and the user. Under
# the default on_inaccurate="exact" the guard sees the NaN on its sampled rows and returns exact attention.
ALLOW = {"on_inaccurate": "allow"} if GUARD else {}

LEFT_PADDED_CAUSAL = Example(
    Spelling("operator", "transpose", "multiply", "function", "bool_buffer", "additive_large", "same"),
    torch.float64, n=6, head_dim=8, scale_value=8 ** -0.5, magnitude=0.3, padded="left", degree=2, seed=0)


@pytest.mark.parametrize("causal", ["bool_buffer", "where_positions"])
def test_causal_attention_with_additive_padding_mask_has_no_nan_on_left_padded_rows(causal):
    example = replace(LEFT_PADDED_CAUSAL, spelling=replace(LEFT_PADDED_CAUSAL.spelling, causal=causal))
    outcome = compile_and_run(example, policy_for(example, **ALLOW))
    assert any(decision.rewrite for _, decision in outcome.decisions)
    assert not exact_of(example).isnan().any()
    assert not outcome.out.isnan().any()


class TwoLayers(nn.Module):
    """The second layer attends over the first layer's outputs, as a transformer's next layer does."""

    def __init__(self, spelling, scale_value, dtype):
        super().__init__()
        self.first, self.second = Spelled(spelling, scale_value, dtype), Spelled(spelling, scale_value, dtype)

    def forward(self, q, k, v, keep):
        return self.second(q, k, self.first(q, k, v, keep), keep)


@pytest.mark.parametrize("padding,causal,padded", [("additive_finfo", "where_positions", "left"),
                                                   ("additive_finfo", "none", "whole_sequence"),
                                                   ("masked_fill_large", "bool_buffer", "left")])
def test_finite_fill_mask_keeps_real_tokens_finite_through_two_layers(padding, causal, padded):
    # transformers' eager attention: a causal mask and left padding, both filled with finfo.min
    spelling = Spelling("matmul", "transpose", "multiply", "upcast", causal, padding, "same")
    example = Example(spelling, torch.float32, n=8, head_dim=8, scale_value=8 ** -0.5, magnitude=0.3,
                      padded=padded, degree=2, seed=0)
    model = TwoLayers(spelling, example.scale_value, example.dtype)
    inputs = inputs_of(example)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(*inputs)
        compiled = torch.compile(model, backend=lrcompile.backend(policy_for(example, **ALLOW)))(*inputs)
    assert not eager.isnan().any()
    assert not compiled.isnan().any(), f"NaN in {int(compiled.isnan().any(-1).sum())} of {compiled.shape[:-1].numel()} rows"


SDPA_FULLY_PADDED = Example(
    Spelling("sdpa", "transpose", "default", "function", "none", "bool", "same"),
    torch.float32, n=6, head_dim=8, scale_value=8 ** -0.5, magnitude=0.3, padded="whole_sequence", degree=2, seed=0)


@pytest.mark.parametrize("padding,causal,padded", [("bool", "none", "whole_sequence"),
                                                   ("additive_inf", "none", "whole_sequence"),
                                                   ("bool", "is_causal", "left")])
def test_sdpa_site_returns_zeros_like_sdpa_for_queries_that_see_no_key(padding, causal, padded):
    example = replace(SDPA_FULLY_PADDED, padded=padded,
                      spelling=replace(SDPA_FULLY_PADDED.spelling, padding=padding, causal=causal))
    outcome = compile_and_run(example, policy_for(example, **ALLOW))
    assert any(decision.rewrite for _, decision in outcome.decisions)
    exact = exact_of(example)
    assert not exact.isnan().any()
    assert not outcome.out.isnan().any()
