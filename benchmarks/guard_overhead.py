"""What the run-time accuracy guard costs: the same low-rank call with and without it, side by side.

    unguarded   lowrank_attention(..., on_inaccurate="allow"): no check (the polynomial is the model)
    guarded     lowrank_attention(..., on_inaccurate="exact"): the estimate from sampled rows, every call
    sdpa        F.scaled_dot_product_attention, for scale

Inputs have a narrow score range (0.5, below max_error at degree 2), so the guarded call keeps the
low-rank result and the difference is the estimate alone. Forward + backward, interleaved, medians.

    python benchmarks/guard_overhead.py                  # n = 4096 and 16384, d = 64, degree 2: ~3 minutes
    python benchmarks/guard_overhead.py --n 1024 --repeats 1 --results /tmp/R.md

Writes the guard-overhead section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lrcompile  # noqa: E402
from lrcompile import lowrank_attention  # noqa: E402
from lrcompile.bench.machine import machine_description  # noqa: E402
from lrcompile.bench.results import write_results_section  # noqa: E402
from lrcompile.bench.timing import interleaved_runs, median, training_step_times  # noqa: E402
from lrcompile.reference import random_attention_inputs  # noqa: E402

SECTION = "guard-overhead"
METHODS = ("unguarded", "guarded", "sdpa")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    return parser.parse_args(argv)


def method(name: str, degree: int, causal: bool):
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    on_inaccurate = "exact" if name == "guarded" else "allow"
    return lambda q, k, v: lowrank_attention(q, k, v, is_causal=causal, degree=degree, on_inaccurate=on_inaccurate,
                                             site_label=f"benchmark:{name}")


def measure(args) -> list[dict]:
    rows = []
    configurations = [(n, causal) for n in args.n for causal in (False, True)]
    with tqdm(total=len(configurations) * len(METHODS) * (args.warmup + args.repeats), desc="guard overhead") as bar:
        for n, causal in configurations:
            q, k, v = random_attention_inputs(1, args.heads, n, n, args.head_dim, score_range=0.5,
                                              dtype=torch.float32, seed=n)
            grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(n + 1))
            steps = {name: (lambda f=method(name, args.degree, causal): training_step_times(f, q, k, v, grad_out))
                     for name in METHODS}
            lrcompile.reset_stats()
            runs = interleaved_runs(steps, args.warmup, args.repeats, on_run=lambda _name: bar.update())
            fallbacks = lrcompile.stats()["benchmark:guarded"].fallbacks
            row = dict(n=n, causal=causal, fallbacks=fallbacks)
            for name in METHODS:
                row[name] = median([times[1] for times in runs[name]["runs"]])
            rows.append(row)
    return rows


def markdown(args, rows: list[dict]) -> str:
    lines = [
        f"Guard overhead: lowrank_attention forward+backward with the accuracy guard (on_inaccurate=\"exact\") "
        f"and without it (\"allow\"), d = {args.head_dim}, degree {args.degree}, {args.heads} heads, batch 1, "
        f"float32, score range 0.5 (no call falls back), median of {args.repeats} interleaved runs, "
        f"{machine_description()}. Command: `python benchmarks/guard_overhead.py`.",
        "",
        "| n | mask | unguarded ms | guarded ms | guard overhead | SDPA ms | fallbacks |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        overhead = row["guarded"] / row["unguarded"] - 1
        lines.append(f"| {row['n']} | {'causal' if row['causal'] else 'none'} | {row['unguarded'] * 1e3:.1f} | "
                     f"{row['guarded'] * 1e3:.1f} | {overhead:+.1%} | {row['sdpa'] * 1e3:.1f} | {row['fallbacks']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    torch.manual_seed(0)
    rows = measure(args)
    text = markdown(args, rows)
    print(text)
    write_results_section(args.results, SECTION, text)


if __name__ == "__main__":
    main()
