import math

import numpy as np
import pytest

from lrcompile.polynomial import MAX_DEGREE, NotPositiveError, degree_for, exp_polynomial

RANGES = (0.5, 1.0, 2.0, 4.0)


def measured_relative_error(p, bound, points=200_001):
    x = np.linspace(-bound, bound, points)
    return np.max(np.abs(p(x) * np.exp(-x) - 1))


def test_taylor_coefficients_are_inverse_factorials():
    p = exp_polynomial(5, 1.0, "taylor")
    assert p.coefficients == tuple(1 / math.factorial(m) for m in range(6))


@pytest.mark.parametrize("approximation", ["taylor", "chebyshev"])
@pytest.mark.parametrize("bound", RANGES)
def test_reported_bound_holds_and_is_attained(approximation, bound):
    for degree in range(1, 9):
        try:
            p = exp_polynomial(degree, bound, approximation)
        except NotPositiveError:
            continue
        measured = measured_relative_error(p, bound)
        assert measured <= p.relative_error
        # The bound is the exact maximum, not a loose estimate: a dense grid gets close to it.
        assert measured >= 0.999 * p.relative_error


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


def test_every_accepted_polynomial_is_positive_on_its_range():
    for approximation in ("taylor", "chebyshev"):
        for bound in RANGES:
            for degree in range(1, 9):
                try:
                    p = exp_polynomial(degree, bound, approximation)
                except NotPositiveError:
                    continue
                assert np.min(p(np.linspace(-bound, bound, 100_001))) > 0


@pytest.mark.parametrize("approximation", ["taylor", "chebyshev"])
@pytest.mark.parametrize("tolerance", [1e-1, 1e-3, 1e-6])
def test_degree_for_returns_the_smallest_degree_meeting_the_tolerance(approximation, tolerance):
    degree = degree_for(tolerance, 1.0, approximation)
    assert exp_polynomial(degree, 1.0, approximation).relative_error <= tolerance
    for smaller in range(1, degree):
        try:
            assert exp_polynomial(smaller, 1.0, approximation).relative_error > tolerance
        except NotPositiveError:
            pass


def test_degree_for_says_when_no_degree_is_enough():
    with pytest.raises(ValueError, match=f"degree <= {MAX_DEGREE}"):
        degree_for(1e-6, 30.0, "taylor")


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
