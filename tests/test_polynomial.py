import doctest
import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import sympy

from lrcompile.math import polynomial
from lrcompile.math.polynomial import MAX_DEGREE, NotPositiveError, degree_for, exp_polynomial

# Small ranges, where errors are tiny, and the score ranges of real models (B = 10 .. 75), where
# low degrees miss by orders of magnitude and Chebyshev interpolants are often not positive.
RANGES = (0.5, 1.0, 2.0, 4.0, 9.6, 20.0, 75.0, 100.0)
DEGREES = range(1, MAX_DEGREE + 1)


def exp_polynomial_or_none(degree, bound, approximation):
    try:
        return exp_polynomial(degree, bound, approximation)
    except NotPositiveError:
        return None


def sampled(p, points=100_001):
    """P and |P(x) e^{-x} - 1| in float64 on a grid of [-B, B], each with a bound on its rounding error.

    Horner's rule in float64 is off by at most about 2 degree u sum |c_m| |x|^m (u = 2^-53);
    4 (degree + 2) eps covers that, the exp and the final subtraction.
    """
    x = np.linspace(-p.bound, p.bound, points)
    magnitude = np.polyval(np.abs(p.coefficients[::-1]), np.abs(x))
    roundoff = 4 * (p.degree + 2) * np.finfo(float).eps
    values = p(x)
    return values, roundoff * magnitude, np.abs(values * np.exp(-x) - 1), roundoff * (magnitude * np.exp(-x) + 1)


def exact_relative_error(p):
    """max over [-B, B] of |P(x) e^{-x} - 1| at 50 digits, found independently of the module:
    at +-B and at the real roots of P' - P, from mpmath's polynomial root finder."""
    mp = mpmath.MPContext()
    mp.dps = 50
    c = [mp.mpf(v) for v in p.coefficients]
    critical = [(m + 1) * c[m + 1] - c[m] for m in range(p.degree)] + [-c[-1]]
    roots = mp.polyroots(critical[::-1], maxsteps=200, extraprec=200)
    points = [mp.mpf(-p.bound), mp.mpf(p.bound)] + [
        r.real for r in roots if abs(mp.im(r)) < mp.mpf(10) ** -30 and abs(r.real) <= p.bound
    ]
    return max(abs(mp.polyval(c[::-1], t) * mp.exp(-t) - 1) for t in points)


def test_module_docstring_example_holds():
    assert doctest.testmod(polynomial).failed == 0


def test_taylor_coefficients_are_inverse_factorials():
    p = exp_polynomial(5, 1.0, "taylor")
    assert p.coefficients == tuple(1 / math.factorial(m) for m in range(6))


@pytest.mark.parametrize("approximation", ["taylor", "chebyshev"])
@pytest.mark.parametrize("bound", RANGES)
def test_reported_bound_holds_and_is_attained_for_every_degree(approximation, bound):
    for degree in DEGREES:
        p = exp_polynomial_or_none(degree, bound, approximation)
        if p is None:
            continue
        _, _, error, roundoff = sampled(p)
        # An upper bound: no sampled point exceeds it by more than float64's own rounding.
        assert np.all(error - roundoff <= p.relative_error), (degree, bound)
        # And not a loose one: a dense grid comes within 1% of it (wherever float64 can resolve it).
        assert p.relative_error <= 1.01 * np.max(error + roundoff), (degree, bound)


@pytest.mark.parametrize(
    "degree, bound, approximation",
    [(16, 0.5, "taylor"), (12, 1.0, "taylor"), (12, 0.5, "chebyshev"), (8, 1.0, "chebyshev"), (16, 2.0, "chebyshev")],
)
def test_bound_is_tight_where_float64_sampling_cannot_see_the_error(degree, bound, approximation):
    p = exp_polynomial(degree, bound, approximation)
    exact = exact_relative_error(p)
    assert exact <= p.relative_error <= exact * (1 + 1e-9)


@pytest.mark.parametrize("approximation", ["taylor", "chebyshev"])
@pytest.mark.parametrize("bound", RANGES)
def test_positivity_verdict_matches_dense_sampling(approximation, bound):
    for degree in DEGREES:
        p = exp_polynomial_or_none(degree, bound, approximation)
        if p is None:
            # A refused P reaches zero or below on the grid, up to float64's rounding.
            coefficients = (
                tuple(1 / math.factorial(m) for m in range(degree + 1))
                if approximation == "taylor"
                else polynomial._chebyshev_coefficients(degree, polynomial._exact_bound(bound))
            )
            x = np.linspace(-bound, bound, 100_001)
            roundoff = 4 * (degree + 2) * np.finfo(float).eps * np.polyval(np.abs(coefficients[::-1]), np.abs(x))
            assert np.any(np.polyval(coefficients[::-1], x) <= roundoff), (degree, bound)
        else:
            values, roundoff, _, _ = sampled(p)
            assert np.all(values + roundoff > 0), (degree, bound)


@pytest.mark.parametrize(
    "degree, bound, previous",
    [(2, 1.0, 0.35914091458867353), (4, 1.0, 0.01935568569150765), (8, 2.0, 0.008664800815081024),
     (16, 9.6, 1345543.221072998), (16, 20.0, 8336462057507880.0)],
)
def test_taylor_bounds_match_the_previous_exact_rational_implementation(degree, bound, previous):
    # `previous` came from sympy's exact roots of P' - P, padded by a factor 1 + 1e-9 and 1e-14.
    assert exp_polynomial(degree, bound, "taylor").relative_error == pytest.approx(previous, rel=2e-9)


@pytest.mark.parametrize("approximation", ["taylor", "chebyshev"])
@pytest.mark.parametrize("tolerance", [1e-1, 1e-3, 1e-6])
@pytest.mark.parametrize("bound", [0.5, 1.0, 2.0])
def test_degree_for_returns_the_smallest_degree_meeting_the_tolerance(approximation, tolerance, bound):
    degree = degree_for(tolerance, bound, approximation)
    assert exp_polynomial(degree, bound, approximation).relative_error <= tolerance
    for smaller in range(1, degree):
        p = exp_polynomial_or_none(smaller, bound, approximation)
        assert p is None or p.relative_error > tolerance


@pytest.mark.parametrize("approximation", ["taylor", "chebyshev"])
def test_error_falls_as_degree_rises(approximation):
    errors = [exp_polynomial(g, 1.0, approximation).relative_error for g in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4


def test_chebyshev_beats_taylor_at_the_same_degree():
    for degree in (2, 4, 6):
        assert exp_polynomial(degree, 1.0, "chebyshev").relative_error < exp_polynomial(degree, 1.0, "taylor").relative_error


def test_polynomial_that_is_not_positive_on_the_range_is_refused():
    with pytest.raises(NotPositiveError, match="not positive"):
        exp_polynomial(1, 2.0, "taylor")  # 1 + x vanishes at -1
    with pytest.raises(NotPositiveError):
        exp_polynomial(4, 4.0, "chebyshev")
    assert exp_polynomial(1, 0.5, "taylor").relative_error < 1  # 1 + x > 0 on [-0.5, 0.5]


def test_wide_ranges_give_a_huge_bound_or_a_refusal_not_a_hang():
    assert exp_polynomial(16, 75.0, "taylor").relative_error > 1e20
    with pytest.raises(NotPositiveError):
        exp_polynomial(16, 75.0, "chebyshev")
    for approximation in ("taylor", "chebyshev"):
        with pytest.raises(ValueError, match=f"degree <= {MAX_DEGREE}"):
            degree_for(1e-2, 75.0, approximation)


def test_degree_for_says_when_no_degree_is_enough():
    with pytest.raises(ValueError, match=f"degree <= {MAX_DEGREE}"):
        degree_for(1e-6, 30.0, "taylor")


def test_critical_points_at_the_end_of_an_isolating_interval_are_still_bracketed():
    # sympy isolates the root 1/2 of this Q in (0, 1), whose end 1 is another root: the exact sign
    # test cannot bisect that interval and the narrowing falls back to sympy's refinement.
    x = sympy.Symbol("x")
    critical = sympy.Poly((x + 2) * (2 * x - 1) * (x - 1), x)
    assert ((0, 1), 1) in critical.intervals()
    brackets = polynomial._sign_changes(critical, Fraction(3))
    for root in (Fraction(-2), Fraction(1, 2), Fraction(1)):
        assert any(a <= root <= b for a, b in brackets), root
    assert all(b - a <= Fraction(3, 2**40) for a, b in brackets)


def test_output_error_factor_follows_from_the_relative_error():
    p = exp_polynomial(4, 1.0)
    eps = p.relative_error
    assert p.output_error_factor == pytest.approx(2 * eps / (1 - eps))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(degree=0, bound=1.0), "degree"),
        (dict(degree=2.0, bound=1.0), "degree"),
        (dict(degree=2, bound=0.0), "bound"),
        (dict(degree=2, bound=float("inf")), "bound"),
        (dict(degree=2, bound=1.0, approximation="pade"), "approximation"),
    ],
)
def test_bad_arguments_are_rejected_with_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exp_polynomial(**kwargs)


def test_only_even_taylor_polynomials_need_no_bound():
    from lrcompile.math.polynomial import needs_bound, polynomial_without_bound

    assert [needs_bound(g, "taylor") for g in (1, 2, 3, 4)] == [True, False, True, False]
    assert needs_bound(2, "chebyshev") and needs_bound(4, "chebyshev")
    assert polynomial_without_bound(4).coefficients == exp_polynomial(4, 7.0, "taylor").coefficients
    with pytest.raises(ValueError, match="needs a score range"):
        polynomial_without_bound(3)
