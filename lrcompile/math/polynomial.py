"""Polynomial approximations of exp on [-B, B], with rigorous error bounds.

This module owns the scalar half of the polynomial method: which polynomial P replaces exp,
how far P(x) strays from e^x relative to e^x on the score range, and whether P is positive
there (a non-positive P would make the attention normaliser vanish or change sign, so such a
P is refused, never used).

Coefficients are computed once per (degree, bound, approximation) and rounded to float64, the
numbers the runtime uses; the error bound and the positivity check are then proven for exactly
that float polynomial (its coefficients read as exact rationals): the critical points of
P(x) e^{-x} are isolated exactly with sympy and enclosed with interval arithmetic (mpmath),
so the bound is never an underestimate, is tight to float64's last digits, and costs well under
a second for any degree up to MAX_DEGREE and B up to 100.

    >>> p = exp_polynomial(degree=2, bound=1.0)
    >>> p.coefficients                    # 1 + x + x^2/2
    (1.0, 1.0, 0.5)
    >>> round(p.relative_error, 4)        # max over [-1, 1] of |P(x) - e^x| / e^x, at x = -1
    0.3591
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import mpmath
import sympy
from mpmath.ctx_iv import MPIntervalContext
from mpmath.libmp import round_ceiling, round_floor, to_float

APPROXIMATIONS = ("taylor", "chebyshev")
MAX_DEGREE = 16

# Working digits for the Chebyshev coefficients: converting from the Chebyshev basis to monomials
# cancels up to (1 + sqrt 2)^MAX_DEGREE-fold (about 10^6), and 60 digits leave far more than
# the 17 that float64 keeps.
_DIGITS = 60


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


def needs_bound(degree: int, approximation: str) -> bool:
    """Whether the polynomial needs a score range B to be used safely.

    Even Taylor polynomials are positive on all of R and their coefficients 1/m! do not depend on
    B, so they need none; every other polynomial is positive, and accurate, only on [-B, B].
    """
    return approximation != "taylor" or degree % 2 == 1


def polynomial_without_bound(degree: int, approximation: str = "taylor") -> ExpPolynomial:
    """The polynomial of a kind that needs no score range (see needs_bound): its coefficients are
    the same at every B, and its error fields are those at B = 1."""
    if needs_bound(degree, approximation):
        raise ValueError(f"the {approximation} polynomial of degree {degree} needs a score range (bound)")
    return exp_polynomial(degree, 1.0, approximation)


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


def _exact_bound(bound: float) -> Fraction:
    # Round B up to 1/1024 so nearby run-time estimates share one cache entry; a larger B
    # only makes the bound more conservative. A dyadic B is also exact in binary arithmetic.
    return Fraction(math.ceil(Fraction(bound) * 1024), 1024)


@functools.lru_cache(maxsize=None)
def _exp_polynomial(degree: int, bound: Fraction, approximation: str) -> ExpPolynomial:
    if approximation == "taylor":
        coefficients = tuple(1 / math.factorial(m) for m in range(degree + 1))
    else:
        coefficients = _chebyshev_coefficients(degree, bound)
    lowest, highest, reached = _error_range(coefficients, bound)
    # P = e^x (1 + f), so P > 0 on [-B, B] exactly when f > -1 there: proven by lowest > -1,
    # refuted by a point where f < -1. Only a P that touches 0 leaves both open; count its roots.
    positive = lowest > -1 or (reached >= -1 and coefficients[0] > 0 and _has_no_root(coefficients, bound))
    if not positive:
        raise NotPositiveError(
            f"the {approximation} polynomial of degree {degree} has a root in "
            f"[-{float(bound):g}, {float(bound):g}]: it is not positive on the score range, so "
            f"attention weights could vanish or turn negative; use an even degree or a smaller bound"
        )
    return ExpPolynomial(
        degree=degree,
        bound=float(bound),
        approximation=approximation,
        coefficients=coefficients,
        relative_error=max(-lowest, highest),
    )


def _chebyshev_coefficients(degree: int, bound: Fraction) -> tuple[float, ...]:
    """Monomial coefficients, rounded to float64, of e^x interpolated at the degree+1 Chebyshev
    nodes x_j = B cos(theta_j), theta_j = (2j+1) pi / (2 degree + 2).

    In t = x / B the interpolant is sum_k a_k T_k(t) with a_k = 2/(degree+1) sum_j e^{x_j}
    cos(k theta_j) (a_0 halved, discrete orthogonality of the T_k at the nodes); the integer
    coefficients of each T_k then give those of t^m, and c_m = [t^m] / B^m.
    """
    mp = mpmath.MPContext()  # private, so the precision set here leaks nowhere
    mp.dps = _DIGITS
    n = degree + 1
    b = mp.mpf(bound.numerator) / bound.denominator
    angles = [(2 * j + 1) * mp.pi / (2 * n) for j in range(n)]
    values = [mp.exp(b * mp.cos(theta)) for theta in angles]
    weights = [2 * mp.fsum(v * mp.cos(k * theta) for v, theta in zip(values, angles)) / n for k in range(n)]
    weights[0] /= 2

    chebyshev = [[1], [0, 1]]  # T_k as the coefficients of t^0 .. t^k
    while len(chebyshev) < n:  # T_{k+1} = 2t T_k - T_{k-1}
        chebyshev.append([2 * c - p for c, p in zip([0, *chebyshev[-1]], [*chebyshev[-2], 0, 0])])
    in_t = [mp.fsum(w * t[m] for w, t in zip(weights, chebyshev) if m < len(t)) for m in range(n)]
    coefficients = tuple(float(in_t[m] / b**m) for m in range(n))
    if not all(math.isfinite(c) for c in coefficients):
        raise ValueError(
            f"the chebyshev coefficients of degree {degree} on [-{float(bound):g}, {float(bound):g}] "
            f"overflow float64; supported: bounds up to a few hundred"
        )
    return coefficients


def _error_range(coefficients: tuple[float, ...], bound: Fraction) -> tuple[float, float, float]:
    """Proven facts about f(x) = P(x) e^{-x} - 1 on [-B, B], for P's float coefficients read as
    exact rationals (the P the runtime evaluates): (lowest, highest, reached) with
    lowest <= f(x) <= highest for every x there, and f(m) <= reached at some m there.

    f'(x) = Q(x) e^{-x} with Q = P' - P, so f is monotone between the points where Q changes sign,
    and its extremes lie at +-B or at those points. `_sign_changes` brackets them exactly; on
    each bracket X, of width <= B 2^-40, with m its midpoint,
        f(X) in f(m) + f'(X) (X - m),   f'(X) = Q(X) e^{-X},   Q(X) in Q(m) + Q'(X) (X - m),
    evaluated in interval arithmetic (mpmath.iv): rigorous, and since Q vanishes in X the
    enclosure exceeds f's true range by about f'' (B 2^-40)^2, far below float64's resolution.
    """
    iv = MPIntervalContext()  # private, so the precision set here leaks nowhere
    iv.prec = _precision(coefficients, bound)
    # mpmath rounds exp outward after computing it with guard bits; a few more units in the
    # last place keep the enclosure valid even if that final rounding were an ulp off.
    slack = iv.mpf([1 - iv.mpf(2) ** (8 - iv.prec), 1 + iv.mpf(2) ** (8 - iv.prec)])
    p = [iv.mpf(c) for c in coefficients]
    q = [(m + 1) * p[m + 1] - p[m] for m in range(len(p) - 1)] + [-p[-1]]
    q_slope = [(m + 1) * q[m + 1] for m in range(len(q) - 1)]

    def horner(cs, at):
        result = iv.mpf(0)
        for c in reversed(cs):
            result = result * at + c
        return result

    def enclose(rational):  # outward-rounded, so the interval contains the exact rational
        return iv.mpf(rational.numerator) / rational.denominator

    x = sympy.Symbol("x")
    poly = sympy.Poly.from_list([sympy.Rational(c) for c in reversed(coefficients)], x)
    brackets = _sign_changes(poly.diff(x) - poly, bound)

    lowest, highest, reached = math.inf, -math.inf, math.inf
    for a, b in [(-bound, -bound), (bound, bound), *brackets]:
        midpoint = enclose((a + b) / 2).mid  # one number in X, so f is evaluated there tightly
        span = iv.mpf([min(enclose(a).a, midpoint.a), max(enclose(b).b, midpoint.b)])
        at_midpoint = horner(p, midpoint) * iv.exp(-midpoint) * slack - 1
        q_span = horner(q, midpoint) + horner(q_slope, span) * (span - midpoint)
        enclosure = at_midpoint + q_span * iv.exp(-span) * slack * (span - midpoint)
        lowest = min(lowest, to_float(enclosure._mpi_[0], rnd=round_floor))
        highest = max(highest, to_float(enclosure._mpi_[1], rnd=round_ceiling))
        reached = min(reached, to_float(at_midpoint._mpi_[1], rnd=round_ceiling))
    return lowest, highest, reached


def _sign_changes(critical: sympy.Poly, bound: Fraction) -> list[tuple[Fraction, Fraction]]:
    """Brackets [a, b] within [-B, B], each of width <= B 2^-40, holding every point of [-B, B]
    where the polynomial `critical` (Q = P' - P, rational coefficients) changes sign.

    sympy isolates Q's real roots exactly; those of even multiplicity leave Q's sign unchanged and
    are dropped, the others are narrowed by bisection on the exact sign of Q (an integer sum).
    """
    _, integer_critical = critical.clear_denoms()
    integers = [int(c) for c in reversed(integer_critical.all_coeffs())]  # q_0 .. q_g
    width = bound / 2**40

    def sign(value: Fraction) -> int:  # sign of Q(p/r) = sign of r^g Q(p/r), r > 0
        p, r = value.numerator, value.denominator
        total, scale = integers[-1], 1
        for c in reversed(integers[:-1]):
            scale *= r
            total = total * p + c * scale
        return (total > 0) - (total < 0)

    def narrow(a: Fraction, b: Fraction) -> tuple[Fraction, Fraction]:
        low_sign, high_sign = sign(a), sign(b)
        if low_sign * high_sign >= 0:  # an endpoint is another root of Q: let sympy narrow this one
            ends = critical.sqf_part().refine_root(sympy.Rational(a.numerator, a.denominator),
                                                   sympy.Rational(b.numerator, b.denominator), eps=width)
            return tuple(Fraction(int(v.p), int(v.q)) for v in ends)
        while b - a > width:
            middle = (a + b) / 2
            middle_sign = sign(middle)
            if middle_sign == 0:
                return middle, middle
            a, b = (middle, b) if middle_sign == low_sign else (a, middle)
        return a, b

    brackets = []
    for (a, b), multiplicity in critical.intervals():
        a, b = Fraction(int(a.p), int(a.q)), Fraction(int(b.p), int(b.q))
        if multiplicity % 2 == 0 or b < -bound or a > bound:
            continue
        a, b = narrow(a, b) if a < b else (a, b)
        a, b = max(a, -bound), min(b, bound)
        if a <= b:
            brackets.append((a, b))
    return brackets


def _precision(coefficients: tuple[float, ...], bound: Fraction) -> int:
    """Bits enough that rounding in the enclosures is negligible beside f itself.

    The terms of P(x) e^{-x} reach sum |c_m| B^m e^B and can cancel down to float64's rounding
    of the coefficients, about 2^-53; 128 bits beyond their magnitude keep the enclosures tight.
    """
    magnitude = max(math.log2(abs(c)) + m * math.log2(bound) for m, c in enumerate(coefficients) if c)
    return 128 + max(0, math.ceil(magnitude + math.log2(len(coefficients)) + float(bound) * math.log2(math.e)))


def _has_no_root(coefficients: tuple[float, ...], bound: Fraction) -> bool:
    """P has no root in [-B, B], by an exact Sturm count (slow: only for a P that touches 0)."""
    x = sympy.Symbol("x")
    poly = sympy.Poly.from_list([sympy.Rational(c) for c in reversed(coefficients)], x)
    return poly.count_roots(sympy.Rational(-bound.numerator, bound.denominator),
                            sympy.Rational(bound.numerator, bound.denominator)) == 0
