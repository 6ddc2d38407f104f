"""How a method's time scales with sequence length n: log-log slope, and where it crosses another's.

Both read measured (n, value) points; the calibration (lrcompile.bench.calibrate) turns a crossover into
the cost model's rate ratio.
"""

from __future__ import annotations

import math


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) against log(n); None with fewer than two points."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - x_mean) ** 2 for x in xs)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / spread


def crossover(ratios: list[tuple[int, float]]) -> dict:
    """From which n the method stays faster than the baseline, from (n, time / baseline time) sorted by n.

    The crossing after the last n where the method is slower, interpolated linearly in
    log(ratio) against log(n) between the two measured points around it.
    """
    if not ratios:
        return {"n": None, "text": "not measured"}
    slower = [i for i, (_, ratio) in enumerate(ratios) if ratio > 1]
    if not slower:
        return {"n": None, "text": f"faster at every measured n (from {ratios[0][0]})"}
    last = slower[-1]
    if last == len(ratios) - 1:
        return {"n": None, "text": f"slower at every n up to {ratios[-1][0]}" if len(slower) == len(ratios)
                else f"slower again at the largest n, {ratios[-1][0]}"}
    (n0, r0), (n1, r1) = ratios[last], ratios[last + 1]
    fraction = math.log(r0) / (math.log(r0) - math.log(r1))
    n_cross = math.exp(math.log(n0) + fraction * (math.log(n1) - math.log(n0)))
    return {"n": n_cross, "text": f"n = {n_cross:.0f} (between measured {n0} and {n1})"}
