"""Op-level speed of lowrank_attention against exact attention, at the configurations of the issues.

CPU (default): runs `lrcompile bench` (lrcompile.bench) twice, d = 64 with degree 2 (r = 2145) and d = 32 with
degree 3 (r = 6545): heads 4, batch 1, float32, n = 1024 .. 32768, non-causal and causal, forward
and forward+backward, methods sdpa, math, inductor, lowrank, lowrank_compiled side by side in one
process. The low-rank methods run the factored algorithm (LRCOMPILE_ALGORITHM=factored, unless
set otherwise): the one the cost model's FLOPs and calibration describe; below its switch length
the op itself would compute a call directly (lrcompile.ops.algorithm; benchmarks/short_sequences.py).

CUDA (--device cuda): d = 64, degree 2, 16 heads, batch 1, n = 1024 .. 65536, bfloat16 and float32,
methods sdpa (flash where the dtype has it), inductor (exact attention compiled), lowrank_triton
(LRCOMPILE_KERNELS=triton) and lowrank_torch (the torch sweep), timed with CUDA events, against the
device's measured matmul rate per dtype; and the targets of P9 checked against the same run: fwd+bwd
speed-up over SDPA >= 4x at n = 16384 and 20x at 65536 non-causal, 1.5x and 8x causal; the state
products at >= 30% of the matmul rate. Sized to finish in under 8 minutes on one H200-class GPU.

Writes (paths for CUDA get a _cuda suffix, and its RESULTS.md section is op-speed-cuda)

    benchmarks/RESULTS.md      its section only (between its markers)
    benchmarks/op_speed.png    forward+backward time vs n, log-log (with --memory also op_speed_memory.png)
    benchmarks/op_speed.json   every run of every row, the matmul rate, the machine

    python benchmarks/op_speed.py              # full CPU run: about 70 minutes on 2 cores (see RESULTS.md)
    python benchmarks/op_speed.py --memory     # plus peak memory, one child process per row
    python benchmarks/op_speed.py --calibrate  # and store this machine's calibration from this run
    python benchmarks/op_speed.py --calibrate-from benchmarks/op_speed.json   # from a saved run
    python benchmarks/op_speed.py --device cuda --calibrate                   # the GPU run
    python benchmarks/op_speed.py --device cpu --n 64 128 --repeats 1 --dtypes float32 --configurations 64:2 \\
        --methods sdpa lowrank_torch lowrank_triton --results /tmp/R.md --plot /tmp/op.png --json /tmp/op.json

--calibrate stores the calibrations in this machine's cache (lrcompile.compile.calibration), keyed by the
machine and the kernel implementation each low-rank method ran; --calibration-path writes them
elsewhere instead (lrcompile/compile/reference_calibration.json when measuring the reference machine).
Options other than those below go to `lrcompile bench` unchanged (--n, --repeats, --warmup, --methods,
--causal, --memory, --compiled-max-n, ...); see `python -m lrcompile.bench --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from lrcompile.bench import calibrate  # noqa: E402
from lrcompile.bench import command as bench  # noqa: E402
from lrcompile.bench import methods  # noqa: E402
from lrcompile.compile import calibration  # noqa: E402
from lrcompile.ops import algorithm  # noqa: E402
from lrcompile.bench.report import format_report, mask_name  # noqa: E402
from lrcompile.compile.machine import describe_key  # noqa: E402
from lrcompile.bench.plots import memory_plot_path, plot_memory, plot_times  # noqa: E402
from lrcompile.bench.results import write_results_section  # noqa: E402
from lrcompile.bench.timing import progress_bar  # noqa: E402

SECTION = {"cpu": "op-speed", "cuda": "op-speed-cuda"}
CONFIGURATIONS = {"cpu": ("64:2", "32:3"), "cuda": ("64:2",)}  # head_dim:degree, as the issues ask
DTYPES = {"cpu": ("float32",), "cuda": ("bfloat16", "float32")}
# What the CUDA run measures unless told otherwise: the sizes and methods of P5, with repeats and
# a matmul size meant to keep the whole run (2 dtypes x 2 masks x 7 lengths x 4 methods) under 8
# minutes; the time limit per dtype makes sure of it, reporting lengths it had no time for as skipped.
CUDA_DEFAULTS = {"--n": ["1024", "2048", "4096", "8192", "16384", "32768", "65536"], "--heads": ["16"],
                 "--methods": ["sdpa", "inductor", "lowrank_triton", "lowrank_torch"], "--repeats": ["3"],
                 "--matmul-size": ["8192"], "--memory-budget-gib": ["32"], "--time-limit-s": ["200"]}
# fwd+bwd speed-up over sdpa (same run) that P9 asks of the GPU path (bfloat16, H = 16, d = 64,
# degree 2): (causal, n) -> ratio. They replace P5's (2x, 6x; 1.2x, 3x; 50% of the matmul rate).
TARGETS = {(False, 16384): 4.0, (False, 65536): 20.0, (True, 16384): 1.5, (True, 65536): 8.0}
STATE_PRODUCT_TARGET = 0.3  # of the measured matmul rate


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configurations", nargs="+", default=None, metavar="D:DEGREE",
                        help="head dimension and polynomial degree per configuration (default: CPU 64:2 32:3, "
                             "CUDA 64:2)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=tuple(methods.DTYPES),
                        help="one run per dtype (default: CPU float32, CUDA bfloat16 float32)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=None, help="default benchmarks/op_speed[_cuda].png")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/op_speed[_cuda].json")
    parser.add_argument("--calibrate", action="store_true",
                        help="store the cost model's calibration implied by this run (this machine's cache)")
    parser.add_argument("--calibrate-from", type=Path, metavar="JSON",
                        help="only store the calibration implied by a run's saved JSON (--json of an earlier run)")
    parser.add_argument("--calibration-path", type=Path, default=None,
                        help="write the calibration to this file instead of this machine's cache")
    args, forwarded = parser.parse_known_args(argv)
    fixed_here = [option for option in forwarded if option.split("=")[0] in ("--head-dim", "--degree", "--dtype")]
    if fixed_here:
        parser.error(f"{fixed_here[0]} is set per run here; use --configurations D:DEGREE ... and --dtypes")
    suffix = "_cuda" if args.device == "cuda" else ""
    args.plot = args.plot or HERE / f"op_speed{suffix}.png"
    args.json = args.json or HERE / f"op_speed{suffix}.json"
    if args.device == "cuda":
        given = {option.split("=")[0] for option in forwarded}
        forwarded = forwarded + [part for option, values in CUDA_DEFAULTS.items() if option not in given
                                 for part in (option, *values)]
    configurations = [_configuration(text, parser) for text in args.configurations or CONFIGURATIONS[args.device]]
    bench_parser = bench.add_arguments(argparse.ArgumentParser(prog="op_speed.py (options for lrcompile.bench)"))
    runs = [bench_parser.parse_args([*forwarded, "--device", args.device, "--head-dim", str(d), "--degree", str(g),
                                     "--dtype", dtype])
            for d, g in configurations for dtype in args.dtypes or DTYPES[args.device]]
    return args, runs, forwarded


def _configuration(text, parser):
    try:
        head_dim, degree = (int(part) for part in text.split(":"))
    except ValueError:
        parser.error(f"--configurations takes D:DEGREE pairs such as 64:2, got {text!r}")
    return head_dim, degree


def target_lines(results: list[dict]) -> list[str]:
    """P9's GPU targets against this run: speed-ups over sdpa, and the state products' share of the
    matmul rate (product FLOPs of the FLOP model / the whole step's time: a lower bound)."""
    lines = ["Targets (P9), fwd+bwd speed-up over sdpa in the same run:", "",
             "| dtype | method | mask | n | speed-up | target | met | state products, of matmul rate |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        dtype, matmul_rate = result["settings"]["dtype"], result["matmul"]["gflops"] * 1e9
        rows = {(r["method"], r["n"], r["causal"]): r for r in result["rows"]}
        for method in (m for m in result["settings"]["methods"] if m in methods.LOWRANK_METHODS):
            for (causal, n), target in TARGETS.items():
                row, sdpa = rows.get((method, n, causal)), rows.get(("sdpa", n, causal))
                if row is None or sdpa is None or row["total_s"] is None or sdpa["total_s"] is None:
                    why = (row or {}).get("skipped") or (sdpa or {}).get("skipped") or "n not in this run"
                    lines.append(f"| {dtype} | {method} | {mask_name(causal)} | {n} | - | {target:g}x | "
                                 f"not measured ({why}) | - |")
                    continue
                speedup = sdpa["total_s"] / row["total_s"]
                share = row["product_flops"] / row["total_s"] / matmul_rate
                lines.append(f"| {dtype} | {method} | {mask_name(causal)} | {n} | {speedup:.2f}x | {target:g}x | "
                             f"{'yes' if speedup >= target else 'no'} | {share:.0%} "
                             f"({'>=' if share >= STATE_PRODUCT_TARGET else '<'} {STATE_PRODUCT_TARGET:.0%}) |")
    return lines


def results_markdown(results: list[dict], args, forwarded: list[str]) -> str:
    machine = results[0]["machine"]
    command = " ".join(["python benchmarks/op_speed.py", *(["--device", "cuda"] if args.device == "cuda" else []),
                        *forwarded])
    device = f"{machine['gpu']} (host: " if "gpu" in machine else ""
    lines = [
        "## Op level: lowrank_attention against exact attention" + (" on CUDA" if args.device == "cuda" else ""),
        "",
        f"`{command}` on {device}{machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads)"
        f"{')' if device else ''}, torch {machine['torch']}, {machine['date']}; lrcompile CPU kernels: "
        f"{machine['cpu_kernels']}. Every number below was measured in that run, except those labelled as coming "
        f"from the FLOP model (`lrcompile.math.flops`).",
    ]
    for result in results:
        settings = result["settings"]
        lines += ["", f"### d = {settings['head_dim']}, degree {settings['degree']}, {settings['dtype']}", "",
                  format_report(result)]
    if args.device == "cuda":
        lines += ["", *target_lines(results)]
    lines += ["", f"![forward+backward time vs n]({_relative(args.plot, args.results)})"]
    if results[0]["settings"]["memory"]:
        lines.append(f"![peak memory vs n]({_relative(memory_plot_path(str(args.plot)), args.results)})")
    return "\n".join(lines)


def _relative(path, results_path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(results_path).resolve().parent)


def main(argv=None):
    args, runs, forwarded = parse_arguments(argv)
    if args.calibrate_from:
        write_calibration(json.loads(args.calibrate_from.read_text()), args.calibration_path)
        return
    # the factored algorithm unless the caller set one (module docstring); for these runs only, as
    # main() also runs inside other processes (the tests)
    with algorithm.algorithm_forced(os.environ.get("LRCOMPILE_ALGORITHM") or "factored"):
        results = [bench.run(run_args) for run_args in runs]
    args.json.write_text(json.dumps(results, indent=1))
    plot_times(results, str(args.plot))
    if results[0]["settings"]["memory"]:
        plot_memory(results, memory_plot_path(str(args.plot)))
    write_results_section(args.results, SECTION[args.device], results_markdown(results, args, forwarded))
    print(f"wrote {args.results} (section {SECTION[args.device]}), {args.plot}, {args.json}")
    if args.device == "cuda":
        print("\n".join(target_lines(results)))
    if args.calibrate:
        write_calibration(results, args.calibration_path)


def write_calibration(results: list[dict], path: Path | None = None) -> None:
    """Store the calibrations these runs imply, one per kernel implementation measured; a method whose
    runs cannot be fitted (skipped, or only one mask) is reported and left out."""
    try:
        entries = calibrate.calibration_from(results)
    except ValueError as error:
        print(f"no calibration written: {error}")
        return
    for entry in entries:
        written = calibration.save(entry, path)
        print(f"wrote {written}: {describe_key(entry['key'])}: rate ratio {entry['non_causal']:.3g} non-causal, "
              f"{entry['causal']:.3g} causal, exact kept below n = {entry['shortest_crossover']}")


if __name__ == "__main__":
    progress_bar()  # fail now, not after the first run, where tqdm is missing
    main()
