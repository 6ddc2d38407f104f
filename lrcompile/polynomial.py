"""Polynomial approximations of exp on [-B, B], with rigorous error bounds.

This module owns the scalar half of the polynomial method: which polynomial P replaces exp,
how far P(x) strays from e^x relative to e^x on the score range, and whether P is positive
there (a non-positive P would make the attention normaliser vanish or change sign, so such a
P is refused, never used).

Coefficients and bounds are computed once per (degree, bound, approximation) in exact
rational arithmetic with sympy, then rounded to float for the runtime.

    >>> p = exp_polynomial(degree=2, bound=1.0)
    >>> p.coefficients                    # 1 + x + x^2/2
    (1.0, 1.0, 0.5)
    >>> round(p.relative_error, 4)        # max over [-1, 1] of |P(x) - e^x| / e^x
    0.2642
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

APPROXIMATIONS = ("taylor", "chebyshev")
MAX_DEGREE = 16

# Digits used when an exact value (a root of P' - P, e^B) has to be evaluated numerically;
# far beyond float64, so the bounds below are correct to the last float digit.
_DIGITS = 50


@dataclass(frozen=True)
class ExpPolynomial:
    """P(x) = sum_m coefficients[m] x^m, approximating e^x on [-bound, bound]."""

    degree: int
    bound: float
    approximation: str
    coefficients: tuple[float, ...]
    relative_error: float  # eps: |P(x) - e^x| <= eps e^x for all |x| <= bound

    @property
    def output_error_factor(self) -> float:
        """Bound on |out - out_exact| / max|v| implied by `relative_error`.

        Every weight P(x_ij) = e^{x_ij}(1 + delta_ij) with |delta| <= eps, so the normalised
        weights are within a factor (1 +- eps)/(1 -+ eps) of softmax's and their L1 distance
        per row is at most 2 eps / (1 - eps): each output entry is off by at most that times
        max |v| (Alman & Song).
        """
        eps = self.relative_error
        return float("inf") if eps >= 1 else 2 * eps / (1 - eps)

    def __call__(self, x):
        """Evaluate P by Horner's rule; works on floats and tensors alike."""
        result = self.coefficients[-1]
        for c in reversed(self.coefficients[:-1]):
            result = result * x + c
        return result


def exp_polynomial(degree: int, bound: float, approximation: str = "taylor") -> ExpPolynomial:
    """The degree-`degree` approximation of exp on [-bound, bound].

    Raises ValueError if the arguments are out of range or if P is not positive on the whole
    range (odd Taylor degrees and low-degree Chebyshev interpolants on wide ranges).
    """
    _check_arguments(degree, bound, approximation)
    return _exp_polynomial(int(degree), _exact_bound(bound), approximation)


def degree_for(tolerance: float, bound: float, approximation: str = "taylor") -> int:
    """Smallest degree whose positive approximation meets `relative_error <= tolerance`.

    Raises ValueError if no degree up to MAX_DEGREE does: the score range is too wide for the
    polynomial method at that tolerance, and exact attention should be kept.
    """
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    closest = None
    for degree in range(1, MAX_DEGREE + 1):
        try:
            p = exp_polynomial(degree, bound, approximation)
        except NotPositiveError:
            continue
        if p.relative_error <= tolerance:
            return degree
        closest = p
    achieved = f"; degree {closest.degree} reaches {closest.relative_error:.3g}" if closest else ""
    raise ValueError(
        f"no {approximation} polynomial of degree <= {MAX_DEGREE} approximates exp to relative "
        f"error {tolerance:g} on [-{bound:g}, {bound:g}]{achieved}"
    )


class NotPositiveError(ValueError):
    """P has a root in [-B, B]: attention weights would vanish or turn negative."""


def _check_arguments(degree, bound, approximation):
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {approximation!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= MAX_DEGREE:
        raise ValueError(f"degree must be an int in [1, {MAX_DEGREE}], got {degree!r}")
    if not bound > 0 or bound == float("inf"):
        raise ValueError(f"bound must be a finite positive number, got {bound!r}")


def _exact_bound(bound: float) -> sympy.Rational:
    # Round B up to 1/1024 so nearby run-time estimates share one cache entry; a larger B
    # only makes the bound more conservative.
    return sympy.ceiling(sympy.Rational(bound) * 1024) / 1024


@functools.lru_cache(maxsize=None)
def _exp_polynomial(degree: int, bound: sympy.Rational, approximation: str) -> ExpPolynomial:
    x = sympy.Symbol("x")
    if approximation == "taylor":
        poly = sympy.Poly([sympy.Rational(1, sympy.factorial(m)) for m in reversed(range(degree + 1))], x)
    else:
        poly = _chebyshev_interpolant(degree, bound, x)

    if poly.count_roots(-bound, bound) > 0 or poly.eval(0) <= 0:
        raise NotPositiveError(
            f"the {approximation} polynomial of degree {degree} has a root in "
            f"[-{float(bound):g}, {float(bound):g}]: it is not positive on the score range, so "
            f"attention weights could vanish or turn negative; use an even degree or a smaller bound"
        )
    coefficients = tuple(float(c) for c in reversed(poly.all_coeffs()))
    return ExpPolynomial(
        degree=degree,
        bound=float(bound),
        approximation=approximation,
        coefficients=coefficients,
        relative_error=_max_relative_error(poly, bound, x),
    )


def _chebyshev_interpolant(degree: int, bound: sympy.Rational, x: sympy.Symbol) -> sympy.Poly:
    """Interpolate e^x at the degree+1 Chebyshev nodes of [-B, B], in the monomial basis.

    The nodes are irrational; they are rounded to rationals at _DIGITS digits, so what we
    interpolate at is a set of rational points within 1e-50 of the Chebyshev nodes and every
    later step (coefficients, roots, error bound) is exact for the polynomial actually used.
    """
    nodes = [
        sympy.Rational(sympy.N(bound * sympy.cos((2 * j + 1) * sympy.pi / (2 * degree + 2)), _DIGITS))
        for j in range(degree + 1)
    ]
    values = [sympy.Rational(sympy.N(sympy.exp(node), _DIGITS)) for node in nodes]
    return sympy.Poly(sympy.interpolate(list(zip(nodes, values)), x), x)


def _max_relative_error(poly: sympy.Poly, bound: sympy.Rational, x: sympy.Symbol) -> float:
    """max over [-B, B] of |P(x) e^{-x} - 1|.

    f(x) = P(x) e^{-x} - 1 has f'(x) = (P'(x) - P(x)) e^{-x}, so its extrema on [-B, B] lie at
    the endpoints or at real roots of the polynomial P' - P: evaluate f exactly there.
    """
    candidates = [-bound, bound]
    critical = sympy.Poly(poly.diff(x) - poly, x)
    if critical.degree() > 0:
        for root in critical.real_roots():
            if -bound <= root <= bound:
                candidates.append(root)
    worst = max(abs(sympy.N(poly.as_expr().subs(x, c) * sympy.exp(-c) - 1, _DIGITS)) for c in candidates)
    # The runtime uses P's coefficients rounded to float64; pad by far more than that
    # rounding moves P(x) e^{-x}, so the bound also holds for the polynomial actually evaluated.
    return float(worst) * (1 + 1e-9) + 1e-14
