"""What each layer of the CPU implementation buys: the same op on its three paths, side by side.

    c_sweep     the chunk loops in C, one head per thread (lrcompile/kernels/csrc/sweeps.h): the default
    c_kernels   the torch sweep (lrcompile/kernels/reference.py), heads split over Python threads, calling
                the C feature maps and in-chunk blocks
    torch       torch operations only (LRCOMPILE_NATIVE=0, or no C compiler)
    sdpa        F.scaled_dot_product_attention, the baseline

and the layout of the (r, d_v + 1) states the sweeps keep column-major: MKL's products with
65 columns, single-threaded, row-major against column-major.

    python benchmarks/kernel_paths.py            # n = 4096 and 16384, d = 64, degree 2: about 5 minutes
    python benchmarks/kernel_paths.py --n 2048 --repeats 1 --results /tmp/R.md

Writes the kernel-paths section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lrcompile import lowrank_attention  # noqa: E402
from lrcompile.bench import command as bench  # noqa: E402
from lrcompile.kernels import cpu  # noqa: E402
from lrcompile.bench.machine import machine_description  # noqa: E402
from lrcompile.bench.results import write_results_section  # noqa: E402
from lrcompile.bench.timing import interleaved_runs, median, progress_bar  # noqa: E402
from lrcompile.math.features import feature_dim  # noqa: E402

SECTION = "kernel-paths"
PATHS = ("sdpa", "c_sweep", "c_kernels", "torch")


@contextlib.contextmanager
def path(name: str):
    """Make lowrank_attention take one path for the duration."""
    saved = cpu.sweep, cpu.enabled
    if name == "c_kernels":
        cpu.sweep = lambda *args, **kwargs: None
    elif name == "torch":
        cpu.enabled = lambda: False
    try:
        yield
    finally:
        cpu.sweep, cpu.enabled = saved


def step(name: str, q, k, v, grad_out, causal: bool):
    def run() -> tuple[float]:
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        if name == "sdpa":
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad_out)
        else:
            with path(name):
                lowrank_attention(q, k, v, is_causal=causal).backward(grad_out)
        return (time.perf_counter() - start,)
    return run


def time_paths(args) -> list[dict]:
    rows = []
    progress = progress_bar()(total=len(args.n) * 2 * (1 + args.repeats) * len(PATHS), desc="timing", unit="run")
    for n in args.n:
        settings = bench.Settings.from_args(bench.add_arguments(argparse.ArgumentParser()).parse_args(
            ["--n", str(n), "--head-dim", str(args.head_dim), "--heads", str(args.heads)]))
        q, k, v, grad_out = bench.attention_inputs(settings, n)
        for causal in (False, True):
            steps = {name: step(name, q, k, v, grad_out, causal) for name in PATHS}
            measured = interleaved_runs(steps, warmup=1, repeats=args.repeats, on_run=lambda _: progress.update())
            for name in PATHS:
                rows.append({"n": n, "causal": causal, "path": name,
                             "seconds": median([t for (t,) in measured[name]["runs"]])})
            progress.write(f"  n = {n}, {'causal' if causal else 'non-causal'}: " + ", ".join(
                f"{r['path']} {r['seconds'] * 1e3:.0f} ms" for r in rows[-len(PATHS):]))
    progress.close()
    return rows


def state_layouts(head_dim: int, chunk: int, repeats: int) -> list[dict]:
    """Single-threaded MKL products with a 65-column state, as the sweeps run them per core."""
    r, columns = feature_dim(head_dim, 2), head_dim + 1
    flops = 2 * r * chunk * columns
    features = torch.randn(r, chunk)  # feature-major block
    values = torch.randn(chunk, columns)
    layouts = {"row-major": torch.randn(r, columns), "column-major": torch.randn(columns, r).mT}
    out = {"row-major": torch.empty(chunk, columns), "column-major": torch.empty(columns, chunk).mT}
    products = {
        "S += psi^T W^ (state)": lambda layout: layouts[layout].addmm_(features, values),
        "O^ = phi S (outputs)": lambda layout: torch.mm(features.mT, layouts[layout], out=out[layout]),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for product, run in products.items():
            for layout in layouts:
                run(layout)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    for _ in range(20):
                        run(layout)
                    times.append((time.perf_counter() - start) / 20)
                rows.append({"product": product, "layout": layout, "gflops": flops / median(times) / 1e9})
    finally:
        torch.set_num_threads(threads)
    return rows


def markdown(rows: list[dict], layouts: list[dict], args, argv) -> str:
    command = " ".join(["python benchmarks/kernel_paths.py", *argv])
    lines = ["## What each layer of the CPU implementation buys", "",
             f"`{command}` on {machine_description()}.", "",
             f"The op, forward + backward, batch 1, heads {args.heads}, d = {args.head_dim}, degree 2, float32, on "
             f"each of its paths (see the script's docstring); median of {args.repeats} interleaved runs; speed-up "
             f"= sdpa's time / the path's, same run.", "",
             "| n | mask | " + " | ".join(f"{p} ms" for p in PATHS) + " | " +
             " | ".join(f"{p} speed-up" for p in PATHS[1:]) + " |",
             "|" + "---|" * (2 + 2 * len(PATHS) - 1)]
    by_key = {(r["n"], r["causal"], r["path"]): r["seconds"] for r in rows}
    for n in args.n:
        for causal in (False, True):
            times = [by_key[n, causal, p] for p in PATHS]
            lines.append(f"| {n} | {'causal' if causal else 'non-causal'} | " +
                         " | ".join(f"{t * 1e3:.0f}" for t in times) + " | " +
                         " | ".join(f"{times[0] / t:.2f}x" for t in times[1:]) + " |")
    lines += ["", f"State layout: MKL, one thread, r = {feature_dim(args.head_dim, 2)} features, "
              f"{args.head_dim + 1} columns, chunk {args.chunk}, GFLOP/s (median of {args.repeats} x 20 calls):", "",
              "| product | row-major | column-major |", "|---|---|---|"]
    for product in dict.fromkeys(r["product"] for r in layouts):
        rates = {r["layout"]: r["gflops"] for r in layouts if r["product"] == product}
        lines.append(f"| {product} | {rates['row-major']:.0f} | {rates['column-major']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="chunk of the layout products, default %(default)s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    if cpu.library() is None:
        parser.error(f"the C kernels are unavailable here ({cpu.status()}): nothing to compare")
    print(f"kernel_paths: {machine_description()}", flush=True)
    rows = time_paths(args)
    layouts = state_layouts(args.head_dim, args.chunk, args.repeats)
    text = markdown(rows, layouts, args, argv)
    print(text)
    write_results_section(args.results, SECTION, text)
    print(f"wrote {args.results} (section {SECTION})")


if __name__ == "__main__":
    main()
