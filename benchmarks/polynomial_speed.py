"""Time to build each polynomial and its proven error bound, uncached, and degree_for over all degrees.

The policy calls `degree_for` (degree="auto") on real score ranges, so every (degree, B,
approximation) must be proven in well under a second (docs/design.md, section 2).

    python benchmarks/polynomial_speed.py
"""

import time

from lrcompile.math import polynomial
from lrcompile.math.polynomial import APPROXIMATIONS, MAX_DEGREE, degree_for, exp_polynomial

RANGES = (0.5, 1.0, 2.0, 4.0, 9.6, 20.0, 40.0, 75.0, 100.0)


def timed(function, *args):
    polynomial._exp_polynomial.cache_clear()
    start = time.perf_counter()
    try:
        outcome = function(*args)
    except ValueError as error:  # NotPositiveError, or no degree meets the tolerance
        outcome = type(error).__name__
    return time.perf_counter() - start, outcome


def main():
    worst = (0.0, None)
    for approximation in APPROXIMATIONS:
        for bound in RANGES:
            times = [timed(exp_polynomial, degree, bound, approximation)[0] for degree in range(1, MAX_DEGREE + 1)]
            slowest = max(range(len(times)), key=times.__getitem__)
            print(f"{approximation:9s} B={bound:5g}: slowest degree {slowest + 1:2d} {times[slowest]:.3f} s, "
                  f"all {MAX_DEGREE} degrees {sum(times):.3f} s")
            worst = max(worst, (times[slowest], (slowest + 1, bound, approximation)))
    print(f"worst single call: {worst[0]:.3f} s at (degree, B, approximation) = {worst[1]}")
    for approximation in APPROXIMATIONS:
        for bound in RANGES:
            for tolerance in (1e-2, 1e-6):
                seconds, degree = timed(degree_for, tolerance, bound, approximation)
                print(f"degree_for({tolerance:g}, {bound:g}, {approximation!r}): {seconds:.3f} s -> {degree}")


if __name__ == "__main__":
    main()
