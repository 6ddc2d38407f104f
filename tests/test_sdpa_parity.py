"""lowrank_attention against F.scaled_dot_product_attention, call for call.

The cases follow PyTorch's own: the OpInfo `sample_inputs_scaled_dot_product_attention`
(3-D and 4-D inputs, query with fewer leading axes than key/value, is_causal, dropout_p, GQA, a
(n_q, n_k) float mask), `test/test_transformers.py` (broadcast batch and head axes, scale 0 and
-1e4, fully masked rows, empty tensors, bool/float masks, float32/float64/bfloat16) and the SDPA
docstring (positional calls, enable_gqa, masks broadcast to (..., n_q, n_k)).

For every case: accepted or rejected as SDPA accepts or rejects it (in the case's dtype); then
shape, dtype, values and every gradient (query, key, value, float mask) against SDPA run in
float64 on the same values. The op runs Taylor degree 10 on inputs whose scores stay within
|s q.k| <= 0.5 (centred keys: <= 1), where the polynomial's output error factor is ~1e-7; the
tolerance is that bound times max|v|, plus the dtype's rounding (TOLERANCE).

DOCUMENTED lists where the op differs from SDPA on purpose; those cases assert the difference.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F

from lrcompile import lowrank_attention
from lrcompile.math.polynomial import exp_polynomial

DEGREE = 10
SCORE_RANGE = 0.5
# The op centres non-causal keys, which can double the range it sees.
POLYNOMIAL_ERROR = exp_polynomial(DEGREE, 2 * SCORE_RANGE).output_error_factor
# Rounding of the op's output and gradients in each dtype, relative to their size; bfloat16 also
# rounds the inputs of every product the op computes in float32 from bf16 values.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2}

# Fresh inputs on every run; the seed is in every failure message.
SEED = torch.seed() % 2**31

DOCUMENTED = {
    "query_varying_mask": "a mask that varies along the query axis (not a key-padding mask): ValueError",
    "dropout": "dropout_p > 0: ValueError (the attention weights are never formed)",
    "causal_negative_scale": "is_causal with a zero or negative scale: SDPA's CPU kernel returns NaN rows; the "
                             "op returns the causal softmax (compared with SDPA given the same mask as a bool tril)",
    "causal_with_mask": "attn_mask together with is_causal: both apply (the key-padding mask AND the causal mask); "
                        "SDPA's CPU kernel does the same without autograd, and refuses the pair with it",
    "mask_gradient_per_key": "a float mask with a query axis of equal rows that requires grad, other than an "
                             "expand of a (..., 1, n_k) tensor: ValueError (its per-row gradient is never formed)",
    "absorbed_mask": "rows whose float mask absorbs the scores (finfo.min): same values (the plain average), "
                     "but zero gradient for query/key, where SDPA differentiates a function its forward "
                     "rounded away",
    "non_finite_scale": "scale inf or nan: ValueError (SDPA returns NaN or zeros)",
    "key_counts_differ": "key and value with different key counts: ValueError (SDPA's CPU kernel accepts them)",
}


@dataclass(frozen=True)
class Case:
    name: str
    q: tuple
    k: tuple
    v: tuple | None = None
    mask: str | None = None  # a kind, see make_mask
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    dtype: torch.dtype = torch.float64
    positional: bool = False
    dropout_p: float = 0.0
    documented: str | None = None
    mask_dtype: torch.dtype | None = None  # a float mask's dtype when not q's
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def __str__(self):
        return f"{self.name} (seed {SEED})"


SHAPES = {
    # name: (q, k, v, enable_gqa)
    "4d": ((2, 3, 5, 4), (2, 3, 7, 4), None, False),
    "3d": ((3, 5, 4), (3, 7, 4), None, False),
    "2d": ((5, 4), (7, 4), None, False),
    "5d": ((2, 2, 2, 5, 4), (2, 2, 2, 7, 4), None, False),
    "opinfo_broadcast_query": ((3, 5, 4), (2, 3, 7, 4), None, False),
    "query_one_head": ((2, 1, 5, 4), (2, 3, 7, 4), None, False),
    "key_one_batch": ((2, 3, 5, 4), (1, 3, 7, 4), None, False),
    "key_value_one_head": ((2, 3, 5, 4), (2, 1, 7, 4), None, False),
    "key_value_broadcast_differently": ((2, 3, 5, 4), (2, 1, 7, 4), (1, 3, 7, 4), False),
    "query_2d_key_4d": ((5, 4), (2, 3, 7, 4), None, False),
    "value_dim_differs": ((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6), False),
    "more_queries_than_keys": ((2, 2, 9, 4), (2, 2, 4, 4), None, False),
    "one_query": ((2, 2, 1, 4), (2, 2, 6, 4), None, False),
    "one_key": ((2, 2, 5, 4), (2, 2, 1, 4), None, False),
    "gqa": ((2, 4, 5, 4), (2, 2, 7, 4), None, True),
    "gqa_one_kv_head": ((2, 4, 5, 4), (2, 1, 7, 4), None, True),
    "gqa_key_value_heads_differ": ((2, 4, 5, 4), (2, 2, 7, 4), (2, 1, 7, 4), True),
    "gqa_broadcast_batch": ((1, 4, 5, 4), (2, 2, 7, 4), None, True),
    "gqa_same_heads": ((2, 2, 5, 4), (2, 2, 7, 4), None, True),
    "opinfo_gqa_3d": ((4, 5, 4), (4, 7, 4), None, True),
}
EMPTY_SHAPES = {
    "empty_batch": ((0, 2, 5, 4), (0, 2, 7, 4), None, False),
    "empty_heads": ((2, 0, 5, 4), (2, 0, 7, 4), None, False),
    "empty_queries": ((2, 2, 0, 4), (2, 2, 7, 4), None, False),
    "empty_keys": ((2, 2, 5, 4), (2, 2, 0, 4), None, False),
    "empty_head_dim": ((2, 2, 5, 0), (2, 2, 7, 0), (2, 2, 7, 3), False),
    "empty_value_dim": ((2, 2, 5, 4), (2, 2, 7, 4), (2, 2, 7, 0), False),
}
MASKS = ["bool_padding", "float_padding", "bool_2d", "float_rows_equal", "bool_fully_masked",
         "float_fully_masked", "bool_per_head"]
REJECTED = {
    # name: (q, k, v, kwargs) that SDPA rejects
    "dtypes_differ": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(k_dtype=torch.float32)),
    "head_dim_differs": ((2, 2, 5, 4), (2, 2, 7, 3), (2, 2, 7, 4), {}),
    "key_counts_differ": ((2, 2, 5, 4), (2, 2, 7, 4), (2, 2, 6, 4), dict(documented="key_counts_differ")),
    "batch_does_not_broadcast": ((2, 3, 5, 4), (3, 3, 7, 4), None, {}),
    "heads_without_gqa": ((2, 4, 5, 4), (2, 2, 7, 4), None, {}),
    "gqa_heads_not_a_multiple": ((2, 4, 5, 4), (2, 3, 7, 4), None, dict(enable_gqa=True)),
    "gqa_query_fewer_heads": ((2, 2, 5, 4), (2, 4, 7, 4), None, dict(enable_gqa=True)),
    "gqa_2d": ((5, 4), (7, 4), None, dict(enable_gqa=True)),
    "query_1d": ((4,), (7, 4), None, {}),
    "mask_1d": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(mask="shape:7")),
    "mask_too_many_axes": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(mask="shape:1,2,2,5,7")),
    "mask_larger_batch": ((1, 2, 5, 4), (1, 2, 7, 4), None, dict(mask="shape:2,1,5,7")),
    "mask_wrong_keys": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(mask="shape:2,1,1,6")),
    "mask_integer": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(mask="integer")),
    "mask_float64_for_float32": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(mask="float_padding", dtype=torch.float32,
                                                                          mask_dtype=torch.float64)),
    "is_causal_not_bool": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(is_causal=1)),
    "negative_dropout": ((2, 2, 5, 4), (2, 2, 7, 4), None, dict(dropout_p=-0.5)),
}


def generate_cases() -> list[Case]:
    cases = []
    # Every shape with the common masks; the rarer masks and the scales on a spread of shapes.
    all_masks = {"4d", "3d", "2d", "5d", "opinfo_broadcast_query", "key_value_broadcast_differently", "gqa",
                 "gqa_key_value_heads_differ", "gqa_broadcast_batch", "more_queries_than_keys"}
    all_scales = {"4d", "3d", "opinfo_broadcast_query", "gqa", "more_queries_than_keys", "one_query"}
    for (shape_name, (q, k, v, gqa)), causal in itertools.product(SHAPES.items(), (False, True)):
        base = Case(f"{shape_name}-causal{int(causal)}", q, k, v, is_causal=causal, enable_gqa=gqa)
        cases.append(base)
        for mask in MASKS if shape_name in all_masks else MASKS[:2]:
            if mask == "bool_per_head" and len(q) < 4:
                continue
            cases.append(replace(base, name=f"{base.name}-{mask}", mask=mask))
        for scale in (0.7, 0.0, -0.5, -1e4) if shape_name in all_scales else ():
            documented = "causal_negative_scale" if causal and scale <= 0 else None
            cases.append(replace(base, name=f"{base.name}-scale{scale:g}", scale=scale, documented=documented))
        cases.append(replace(base, name=f"{base.name}-positional", positional=True, scale=0.6,
                             mask="bool_padding" if len(q) == 4 else None))
    for (shape_name, (q, k, v, gqa)), causal, dtype in itertools.product(
            [(name, SHAPES[name]) for name in ("4d", "2d", "opinfo_broadcast_query", "gqa", "key_one_batch")],
            (False, True), (torch.float32, torch.bfloat16)):
        base = Case(f"{shape_name}-causal{int(causal)}-{str(dtype)[6:]}", q, k, v, is_causal=causal,
                    enable_gqa=gqa, dtype=dtype)
        cases += [base, replace(base, name=base.name + "-float_padding", mask="float_padding"),
                  replace(base, name=base.name + "-float32_mask", mask="float_padding", mask_dtype=torch.float32)]
    for (shape_name, (q, k, v, gqa)), causal, mask in itertools.product(
            EMPTY_SHAPES.items(), (False, True), (None, "bool_padding", "float_padding")):
        cases.append(Case(f"{shape_name}-causal{int(causal)}-{mask}", q, k, v, mask=mask, is_causal=causal,
                          enable_gqa=gqa))
    for name, (q, k, v, kwargs) in REJECTED.items():
        cases.append(Case(name, q, k, v, extra=kwargs, **{key: value for key, value in kwargs.items()
                                                          if key in ("mask", "enable_gqa", "is_causal", "dropout_p",
                                                                     "dtype", "mask_dtype", "documented")}))
    for causal in (False, True):
        cases += [
            Case(f"query_varying_bool-causal{int(causal)}", (2, 2, 5, 4), (2, 2, 7, 4), mask="bool_general",
                 is_causal=causal, documented="query_varying_mask"),
            Case(f"opinfo_query_varying_float-causal{int(causal)}", (2, 2, 5, 4), (2, 2, 7, 4), mask="float_general",
                 is_causal=causal, documented="query_varying_mask"),
            Case(f"opinfo_dropout-causal{int(causal)}", (2, 2, 5, 4), (2, 2, 7, 4), is_causal=causal, dropout_p=0.5,
                 documented="dropout"),
            Case(f"dropout_positional-causal{int(causal)}", (2, 2, 5, 4), (2, 2, 7, 4), is_causal=causal,
                 dropout_p=0.5, positional=True, documented="dropout"),
            Case(f"mask_leaf_with_equal_rows-causal{int(causal)}", (2, 2, 5, 4), (2, 2, 7, 4), mask="float_rows_leaf",
                 is_causal=causal, documented="mask_gradient_per_key"),
            Case(f"absorbed_float_mask-causal{int(causal)}", (2, 2, 5, 4), (2, 2, 7, 4), mask="float_absorbed",
                 is_causal=causal, documented="absorbed_mask"),
            Case(f"left_padded_finfo_min-causal{int(causal)}", (2, 2, 6, 4), (2, 2, 6, 4), mask="float_left_padded",
                 is_causal=causal, documented="absorbed_mask" if causal else None),
        ]
        for scale in (math.inf, math.nan):
            cases.append(Case(f"scale{scale}-causal{int(causal)}", (2, 2, 5, 4), (2, 2, 7, 4), scale=scale,
                              is_causal=causal, documented="non_finite_scale"))
    return cases


CASES = generate_cases()


def make_inputs(case: Case, generator):
    """q, k, v with |s q.k| <= SCORE_RANGE: rows of q and k of norm sqrt(SCORE_RANGE / |s|)."""
    head_dim = case.q[-1] if case.q else 0
    scale = case.scale if case.scale is not None and math.isfinite(case.scale) else None
    s = abs(scale) if scale is not None else (1 / math.sqrt(head_dim) if head_dim else 1.0)
    norm = math.sqrt(SCORE_RANGE / s) if s > 0 else 1.0

    def rows(shape, dtype):
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        if len(shape) and shape[-1]:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm
        return x.to(dtype)

    k_dtype = case.extra.get("k_dtype", case.dtype)
    q = rows(case.q, case.dtype)
    k = rows(case.k, k_dtype)
    v = torch.randn(case.v or case.k, generator=generator, dtype=torch.float64).to(case.dtype)
    return q, k, v


def make_mask(case: Case, q, k, generator):
    kind = case.mask
    if kind is None:
        return None
    n_q, n_k = q.shape[-2] if q.dim() >= 2 else 1, k.shape[-2] if k.dim() >= 2 else 1
    k_lead = k.shape[:-3] + q.shape[-3:-2] if case.enable_gqa and k.dim() >= 3 else k.shape[:-2]
    lead = tuple(torch.broadcast_shapes(q.shape[:-2], k_lead)) if q.dim() >= 2 else ()
    batch = lead[0] if len(lead) >= 3 else 1
    float_dtype = case.mask_dtype or case.dtype

    def keep(*shape):
        attend = torch.rand(shape, generator=generator) > 0.3
        if attend.numel():
            attend[..., 0] = True  # a key every row can see, also causally
        return attend

    def additive(attend):
        bias = torch.randn(attend.shape, generator=generator, dtype=torch.float64)
        return torch.where(attend, bias, -math.inf).to(float_dtype)

    padding_shape = (batch, 1, 1, n_k) if len(lead) >= 2 else (1, n_k)
    if kind == "bool_padding":
        return keep(*padding_shape)
    if kind == "float_padding":
        return additive(keep(*padding_shape))
    if kind == "bool_2d":
        return keep(1, n_k)
    if kind == "float_rows_equal":  # how transformers hands over padding masks: expanded over queries
        leaf = additive(keep(*padding_shape)).requires_grad_()
        return leaf.expand(*padding_shape[:-2], n_q, n_k)
    if kind == "float_rows_leaf":
        return additive(keep(*padding_shape)).expand(*padding_shape[:-2], n_q, n_k).clone().requires_grad_()
    if kind == "bool_fully_masked":  # every key of the first batch entry (or head) masked
        attend = keep(*padding_shape)
        attend.view(-1, n_k)[0] = False
        return attend
    if kind == "float_fully_masked":
        mask = additive(keep(*padding_shape))
        mask.view(-1, n_k)[0] = -math.inf
        return mask
    if kind == "bool_per_head":
        return keep(*lead[:-1], lead[-1] if not case.enable_gqa else q.shape[-3], 1, n_k)
    if kind == "float_absorbed":  # transformers' finfo.min on every key of the first batch entry
        mask = additive(keep(*padding_shape))
        mask[0] = torch.finfo(float_dtype).min
        return mask
    if kind == "float_left_padded":  # first batch entry left-padded by 3, as transformers masks it
        mask = torch.zeros(padding_shape, dtype=float_dtype)
        mask[0, ..., :3] = torch.finfo(float_dtype).min
        return mask
    if kind in ("bool_general", "float_general"):
        attend = torch.rand(n_q, n_k, generator=generator) > 0.3
        attend[:, 0] = True
        return attend if kind == "bool_general" else additive(attend)
    if kind == "integer":
        return torch.ones(padding_shape, dtype=torch.int64)
    if kind.startswith("shape:"):
        return torch.ones(tuple(int(x) for x in kind[6:].split(",")), dtype=torch.bool)
    raise ValueError(kind)


def call(fn, case: Case, q, k, v, mask, **kwargs):
    if case.positional:  # SDPA takes six positionally; scale and enable_gqa are keyword-only there
        return fn(q, k, v, mask, case.dropout_p, case.is_causal, scale=case.scale, enable_gqa=case.enable_gqa,
                  **kwargs)
    return fn(q, k, v, attn_mask=mask, dropout_p=case.dropout_p, is_causal=case.is_causal, scale=case.scale,
              enable_gqa=case.enable_gqa, **kwargs)


def lowrank(q, k, v, *args, **kwargs):
    return lowrank_attention(q, k, v, *args, degree=DEGREE, **kwargs)


def outcome(fn):
    try:
        return fn(), None
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        return None, error


def differentiable(case, q, k, v, mask):
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if mask is not None and mask.is_floating_point():
        if mask.grad_fn is not None:  # an expand of a leaf: the gradient lands on the leaf
            leaves.append(mask._base if mask._base is not None else mask)
        else:
            leaves.append(mask.requires_grad_())
    return leaves


def with_causal(mask, q, k):
    """mask AND SDPA's top-left causal mask, as one attn_mask."""
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if mask is None or mask.dtype == torch.bool:
        return causal if mask is None else mask & causal
    return mask.masked_fill(~causal, -math.inf)


def float64_reference(case, q, k, v, mask):
    """SDPA on float64 copies, differentiable with respect to the same leaves."""
    mask64 = mask
    if mask is not None and mask.is_floating_point():
        mask64 = mask.double()
    is_causal = case.is_causal
    if case.is_causal and (mask is not None or case.documented == "causal_negative_scale"):
        mask64, is_causal = with_causal(mask64, q, k), False
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask64, is_causal=is_causal,
                                          scale=case.scale, enable_gqa=case.enable_gqa)


def assert_close(got, expected, tolerance, what):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{what}: not finite"
    error = (got.double() - expected.double()).abs().max().item()
    limit = tolerance * max(1.0, expected.abs().max().item())
    assert error <= limit, f"{what}: max error {error:.3g} > {limit:.3g}"


RESULTS: dict[str, str] = {}


def run_case(case: Case) -> str:
    """'match', 'rejected' or 'documented'."""
    RESULTS[case.name] = _run_case(case)
    return RESULTS[case.name]


def _run_case(case: Case) -> str:
    generator = torch.Generator().manual_seed((SEED + zlib.crc32(case.name.encode())) % 2**31)
    try:
        q, k, v = make_inputs(case, generator)
    except RuntimeError:  # a shape torch itself cannot build
        return "rejected"
    mask = make_mask(case, q, k, generator)

    refused = {"query_varying_mask": "varies along the query axis", "dropout": "dropout_p must be 0.0",
               "non_finite_scale": "scale must be a finite number", "key_counts_differ": "same number of keys",
               "mask_gradient_per_key": "requires grad"}
    if case.documented in refused:
        expected_message = refused[case.documented]
        if case.is_causal and mask is not None:  # DOCUMENTED["causal_with_mask"]: SDPA takes the combined mask
            sdpa, sdpa_error = outcome(lambda: call(F.scaled_dot_product_attention, replace(case, is_causal=False),
                                                    q, k, v, with_causal(mask, q, k)))
        else:
            sdpa, sdpa_error = outcome(lambda: call(F.scaled_dot_product_attention, case, q, k, v, mask))
        assert sdpa_error is None, f"SDPA itself rejects {case}: {sdpa_error}"
        with pytest.raises(ValueError, match=expected_message):
            call(lowrank, case, q, k, v, mask)
        return "documented"

    if case.is_causal and mask is not None:  # DOCUMENTED["causal_with_mask"]: compared with the combined mask
        sdpa, sdpa_error = outcome(lambda: call(F.scaled_dot_product_attention, replace(case, is_causal=False),
                                                q, k, v, with_causal(mask, q, k)))
    else:
        sdpa, sdpa_error = outcome(lambda: call(F.scaled_dot_product_attention, case, q, k, v, mask))
    leaves = differentiable(case, q, k, v, mask) if sdpa_error is None else []
    ours, our_error = outcome(lambda: call(lowrank, case, q, k, v, mask))
    assert (sdpa_error is None) == (our_error is None), (
        f"{case}: SDPA {'rejects' if sdpa_error else 'accepts'} ({sdpa_error}), "
        f"the op {'rejects' if our_error else 'accepts'} ({our_error})")
    if sdpa_error is not None:
        return "rejected"
    assert ours.shape == sdpa.shape and ours.dtype == sdpa.dtype, (ours.shape, sdpa.shape, ours.dtype, sdpa.dtype)

    expected = float64_reference(case, q, k, v, mask)
    max_v = max(1.0, v.abs().max().item()) if v.numel() else 1.0
    tolerance = POLYNOMIAL_ERROR * max_v + TOLERANCE[case.dtype]
    assert_close(ours, expected, tolerance, f"{case}: output")

    grad_out = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(ours, leaves, grad_out.to(ours.dtype), allow_unused=True)
    want = torch.autograd.grad(expected, leaves, grad_out, allow_unused=True)
    names = ["query", "key", "value", "attn_mask"]
    for name, leaf, a, b in zip(names, leaves, got, want):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf, dtype=torch.float64) if b is None else b
        if case.documented == "absorbed_mask" and name in ("query", "key", "attn_mask"):
            assert torch.isfinite(a.double()).all(), f"{case}: d{name} not finite"
            continue
        # A gradient sums n_q or n_k terms, each within the output's tolerance.
        assert_close(a, b, 10 * tolerance, f"{case}: d{name}")
    return "documented" if case.documented else "match"


def test_there_are_a_few_hundred_cases_with_unique_names():
    assert len(CASES) >= 250
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_op_matches_sdpa(case, record_property):
    result = run_case(case)
    record_property("parity", result)
    if case.documented:
        assert result == "documented" and case.documented in DOCUMENTED


def test_parity_counts(capsys):
    """The suite's totals, printed for the record (pytest -s)."""
    counts = {"match": 0, "rejected": 0, "documented": 0}
    for case in CASES:  # the results of test_op_matches_sdpa where it ran in this session
        counts[RESULTS[case.name] if case.name in RESULTS else run_case(case)] += 1
    paired = sum(case.is_causal and case.mask is not None and RESULTS[case.name] == "match" for case in CASES)
    with capsys.disabled():
        print(f"\nSDPA parity: {len(CASES)} cases: {counts['match']} match SDPA ({paired} of them pair attn_mask "
              f"with is_causal), {counts['rejected']} rejected like SDPA, {counts['documented']} documented "
              f"differences ({len(DOCUMENTED)} kinds)")
    assert counts["documented"] == sum(case.documented is not None for case in CASES)
