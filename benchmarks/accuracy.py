"""Output and gradient error of lowrank_attention against exact softmax attention.

For each approximation, score range B (attained: the largest centred score equals B) and degree
1..6: relative Frobenius error of the output and of the gradients (the worst of dq, dk, dv) in
float64, so the figures are approximation error only. Cells read "output / gradient".

    python benchmarks/accuracy.py                   # print the table
    python benchmarks/accuracy.py --update-readme   # also write it into README.md
"""

import argparse
import warnings
from pathlib import Path

import torch

from lrcompile import lowrank_attention
from lrcompile.bench.command import write_results_section
from lrcompile.math.polynomial import NotPositiveError, exp_polynomial
from lrcompile.reference import exact_attention, random_attention_inputs

RANGES = (0.5, 1.0, 2.0, 4.0)
DEGREES = range(1, 7)
README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "accuracy-table"  # README.md holds <!-- accuracy-table:start/end --> markers


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def measure(approximation, score_range, degree, seed, n=256, head_dim=16):
    try:
        exp_polynomial(degree, score_range, approximation)
    except NotPositiveError:
        return None
    q, k, v = random_attention_inputs(2, 2, n, n, head_dim, score_range=score_range, attained=True, seed=seed)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    exact = exact_attention(q, k, v)
    with warnings.catch_warnings():
        # the inputs attain exactly score_range; the op's range warning uses a looser estimate
        warnings.simplefilter("ignore", UserWarning)
        approx = lowrank_attention(q, k, v, degree=degree, approximation=approximation, bound=score_range)
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad_out)
    approx_grads = torch.autograd.grad(approx, (q, k, v), grad_out)
    return relative_error(approx, exact), max(relative_error(a, b) for a, b in zip(approx_grads, exact_grads))


def table(seed=0) -> str:
    lines = [
        "| approximation | B | " + " | ".join(f"g = {g}" for g in DEGREES) + " |",
        "|---|---|" + "---|" * len(DEGREES),
    ]
    for approximation in ("taylor", "chebyshev"):
        for score_range in RANGES:
            cells = []
            for degree in DEGREES:
                result = measure(approximation, score_range, degree, seed)
                cells.append("not positive" if result is None else f"{result[0]:.1e} / {result[1]:.1e}")
            lines.append(f"| {approximation} | {score_range:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = table(args.seed)
    print(result)
    if args.update_readme:
        write_results_section(README, SECTION, result)
        print(f"updated {README}")


if __name__ == "__main__":
    main()
