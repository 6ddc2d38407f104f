"""Short sequences: the polynomial attention computed directly (the n x n block) against factored,
and against SDPA, side by side.

    sdpa      F.scaled_dot_product_attention (exact softmax), the scale
    before    lowrank_attention(..., on_inaccurate="allow") with LRCOMPILE_ALGORITHM=factored: the
              factored sweeps at every length, as before the direct algorithm existed
    after     the same call as the op chooses (lrcompile.ops.algorithm.uses_direct): direct below the
              crossover, factored above

One training step each (forward, then backward of a fixed grad_out), methods round-robin within
every repeat, medians; ratios are to SDPA of the same run.

    python benchmarks/short_sequences.py                 # n = 256, 512; d = 32, 64; both masks
    python benchmarks/short_sequences.py --threads 1     # one core each: no waiting at thread barriers
    python benchmarks/short_sequences.py --calibrate     # the direct/factored rate ratio

--calibrate times the direct and the factored algorithm alone (both forced) at growing n, finds
where they cross, and reports the rate ratio that puts lrcompile.ops.algorithm's FLOP rule there:
at the crossover the times are equal, so rate_direct / rate_factored = direct FLOPs / factored
FLOPs. DIRECT_RATE_RATIO in lrcompile/ops/algorithm.py is set from it by hand.

Writes the short-sequences section (and with --calibrate the direct-calibration section) of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lrcompile import lowrank_attention  # noqa: E402
from lrcompile.bench.machine import machine_description  # noqa: E402
from lrcompile.bench.results import write_results_section  # noqa: E402
from lrcompile.bench.timing import interleaved_runs, median, training_step_times  # noqa: E402
from lrcompile.math import flops  # noqa: E402
from lrcompile.ops import algorithm  # noqa: E402
from lrcompile.ops.attention import default_chunk_size  # noqa: E402
from lrcompile.reference import random_attention_inputs  # noqa: E402

SECTION = "short-sequences"
CALIBRATION_SECTION = "direct-calibration"
METHODS = ("sdpa", "before", "after")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); the section is named after a non-default count")
    parser.add_argument("--calibrate", action="store_true", help="measure the direct/factored rate ratio instead")
    parser.add_argument("--calibrate-n", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    return parser.parse_args(argv)


def method(name: str, degree: int, causal: bool):
    """attend(q, k, v) for a method; the algorithm is forced for the step's forward and backward."""
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    algorithm = {"before": "factored", "after": "auto"}.get(name, name)

    def attend(q, k, v):
        os.environ["LRCOMPILE_ALGORITHM"] = algorithm  # read by the op's forward and backward alike
        return lowrank_attention(q, k, v, is_causal=causal, degree=degree, on_inaccurate="allow")
    return attend


def time_methods(names, n, head_dim, causal, args, bar) -> dict:
    """{name: (forward median s, fwd+bwd median s)} of one configuration, interleaved."""
    q, k, v = random_attention_inputs(args.batch, args.heads, n, n, head_dim, score_range=2.0,
                                      dtype=torch.float32, seed=n + head_dim)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(n + 1))
    steps = {name: (lambda f=method(name, args.degree, causal): training_step_times(f, q, k, v, grad_out))
             for name in names}
    previous = os.environ.get("LRCOMPILE_ALGORITHM")
    try:
        runs = interleaved_runs(steps, args.warmup, args.repeats, on_run=lambda _name: bar.update())
    finally:
        if previous is None:
            os.environ.pop("LRCOMPILE_ALGORITHM", None)
        else:
            os.environ["LRCOMPILE_ALGORITHM"] = previous
    return {name: tuple(median([times[i] for times in runs[name]["runs"]]) for i in (0, 1)) for name in names}


def measure(args) -> list[dict]:
    configurations = [(n, d, causal) for d in args.head_dim for n in args.n for causal in (False, True)]
    rows = []
    with tqdm(total=len(configurations) * len(METHODS) * (args.warmup + args.repeats), desc="short sequences") as bar:
        for n, head_dim, causal in configurations:
            times = time_methods(METHODS, n, head_dim, causal, args, bar)
            chunk = default_chunk_size(head_dim, args.degree, causal)
            chosen = "direct" if algorithm.uses_direct(n, n, head_dim, head_dim, 1, args.degree, causal, chunk, "cpu") \
                else "factored"
            rows.append(dict(n=n, head_dim=head_dim, causal=causal, chosen=chosen, **times))
    return rows


def markdown(args, rows: list[dict]) -> str:
    lines = [
        f"Short sequences: `lowrank_attention(..., degree={args.degree}, on_inaccurate=\"allow\")` before (factored "
        f"forced, `LRCOMPILE_ALGORITHM=factored`) and after (the op's choice) against "
        f"`F.scaled_dot_product_attention`, batch {args.batch} x {args.heads} heads, float32, score range 2, one "
        f"training step (forward, backward), median of {args.repeats} interleaved runs, ratios to SDPA of the same "
        f"run, {machine_description()}; 1-minute load average {os.getloadavg()[0]:.1f} at the end (other "
        f"processes share the cores). Command: `python benchmarks/short_sequences.py"
        f"{'' if args.threads is None else f' --threads {args.threads}'}`.",
        "",
        "| n | d | mask | chosen | SDPA fwd+bwd ms | before ms | before / SDPA | after ms | after / SDPA "
        "| SDPA fwd ms | before fwd / SDPA | after fwd / SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sdpa, before, after = row["sdpa"], row["before"], row["after"]
        lines.append(
            f"| {row['n']} | {row['head_dim']} | {'causal' if row['causal'] else 'none'} | {row['chosen']} | "
            f"{sdpa[1] * 1e3:.1f} | {before[1] * 1e3:.1f} | {before[1] / sdpa[1]:.2f}x | {after[1] * 1e3:.1f} | "
            f"**{after[1] / sdpa[1]:.2f}x** | {sdpa[0] * 1e3:.1f} | {before[0] / sdpa[0]:.2f}x | "
            f"{after[0] / sdpa[0]:.2f}x |")
    return "\n".join(lines)


# ---- calibration ------------------------------------------------------------------------------


def calibrate(args) -> list[dict]:
    """Per (d, mask): direct and factored fwd+bwd over args.calibrate_n, their crossover, the ratio."""
    configurations = [(d, causal) for d in args.head_dim for causal in (False, True)]
    results = []
    total = len(configurations) * len(args.calibrate_n) * 2 * (args.warmup + args.repeats)
    with tqdm(total=total, desc="direct vs factored") as bar:
        for head_dim, causal in configurations:
            chunk = default_chunk_size(head_dim, args.degree, causal)
            ratios = []
            for n in args.calibrate_n:
                times = time_methods(("direct", "factored"), n, head_dim, causal, args, bar)
                ratios.append((n, times["direct"][1] / times["factored"][1]))
            crossing = _crossover(ratios)
            entry = dict(head_dim=head_dim, causal=causal, chunk=chunk, measured=ratios, crossover=crossing)
            if crossing is not None:
                direct_flops = flops.direct_flops(crossing, crossing, head_dim, head_dim, 1, causal)
                factored = flops.lowrank_flops(crossing, crossing, head_dim, head_dim, 1, causal, args.degree, chunk)
                entry["rate_ratio"] = direct_flops / factored
            results.append(entry)
    return results


def _crossover(ratios):
    """n where direct/factored time crosses 1, interpolated in log n; None if it never does."""
    for (n0, r0), (n1, r1) in zip(ratios, ratios[1:]):
        if r0 < 1 <= r1:
            t = (math.log(1) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))
    return None


def calibration_markdown(args, results) -> str:
    lines = [
        f"Direct / factored calibration: both algorithms of `lowrank_attention(..., degree={args.degree})` forced, "
        f"one training step, batch {args.batch} x {args.heads} heads, float32, median of {args.repeats} interleaved "
        f"runs, {machine_description()}. The rate ratio is direct FLOPs / factored FLOPs "
        f"(`lrcompile.math.flops`) at the measured crossover. Command: `python benchmarks/short_sequences.py --calibrate`.",
        "",
        "| d | mask | chunk | direct time / factored time at n | crossover n | rate ratio |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results:
        measured = ", ".join(f"{n}: {ratio:.2f}" for n, ratio in entry["measured"])
        ratio = f"{entry['rate_ratio']:.2f}" if "rate_ratio" in entry else "-"
        lines.append(f"| {entry['head_dim']} | {'causal' if entry['causal'] else 'none'} | {entry['chunk']} | "
                     f"{measured} | {entry['crossover'] or 'not in range'} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.calibrate:
        text = calibration_markdown(args, calibrate(args))
        section = CALIBRATION_SECTION
    else:
        text = markdown(args, measure(args))
        section = SECTION if args.threads is None else f"{SECTION}-{args.threads}-threads"
    print(text)
    write_results_section(args.results, section, text)


if __name__ == "__main__":
    main()
