"""Op-level speed of lowrank_attention against exact attention, at the configurations of the issue.

Runs `lrcompile.bench` twice, d = 64 with degree 2 (r = 2145) and d = 32 with degree 3 (r = 6545):
heads 4, batch 1, float32, n = 1024 .. 32768, non-causal and causal, forward and forward+backward,
methods sdpa, math, inductor, lowrank, lowrank_compiled side by side in one process. Writes

    benchmarks/RESULTS.md      its op-speed section only (between the op-speed markers)
    benchmarks/op_speed.png    forward+backward time vs n, log-log (with --memory also op_speed_memory.png)
    benchmarks/op_speed.json   every run of every row, the matmul rate, the machine

    python benchmarks/op_speed.py              # full run: about 70 minutes on 2 cores (see RESULTS.md)
    python benchmarks/op_speed.py --memory     # plus peak memory, one child process per row
    python benchmarks/op_speed.py --calibrate  # and recalibrate the cost model from this run
    python benchmarks/op_speed.py --calibrate-from benchmarks/op_speed.json   # from a saved run
    python benchmarks/op_speed.py --n 512 1024 --repeats 1 --results /tmp/R.md --plot /tmp/op.png --json /tmp/op.json

Options other than those below go to lrcompile.bench unchanged (--n, --repeats, --warmup, --methods,
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

from lrcompile import bench, cost  # noqa: E402

SECTION = "op-speed"
CONFIGURATIONS = ("64:2", "32:3")  # head_dim:degree, as the issue asks


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), metavar="D:DEGREE",
                        help="head dimension and polynomial degree per configuration, default %(default)s")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=HERE / "op_speed.png")
    parser.add_argument("--json", type=Path, default=HERE / "op_speed.json")
    parser.add_argument("--calibrate", action="store_true",
                        help="write the cost model's calibration implied by this run to lrcompile/calibration.json")
    parser.add_argument("--calibrate-from", type=Path, metavar="JSON",
                        help="only write the calibration implied by a run's saved JSON (--json of an earlier run)")
    args, forwarded = parser.parse_known_args(argv)
    fixed_here = [option for option in forwarded if option.split("=")[0] in ("--head-dim", "--degree")]
    if fixed_here:
        parser.error(f"{fixed_here[0]} is set per configuration here; use --configurations D:DEGREE ...")
    configurations = [_configuration(text, parser) for text in args.configurations]
    bench_parser = bench.add_arguments(argparse.ArgumentParser(prog="op_speed.py (options for lrcompile.bench)"))
    runs = [bench_parser.parse_args([*forwarded, "--head-dim", str(d), "--degree", str(g)]) for d, g in configurations]
    return args, runs, forwarded


def _configuration(text, parser):
    try:
        head_dim, degree = (int(part) for part in text.split(":"))
    except ValueError:
        parser.error(f"--configurations takes D:DEGREE pairs such as 64:2, got {text!r}")
    return head_dim, degree


def results_markdown(results: list[dict], args, forwarded: list[str]) -> str:
    machine = results[0]["machine"]
    command = " ".join(["python benchmarks/op_speed.py", *forwarded])
    lines = [
        "## Op level: lowrank_attention against exact attention",
        "",
        f"`{command}` on {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, {machine['date']}; lrcompile CPU kernels: {machine['cpu_kernels']}. Every "
        f"number below was measured in that run, except "
        f"those labelled as coming from the FLOP model (`lrcompile.cost`).",
    ]
    for result in results:
        settings = result["settings"]
        lines += ["", f"### d = {settings['head_dim']}, degree {settings['degree']}", "", bench.format_report(result)]
    lines += ["", f"![forward+backward time vs n]({_relative(args.plot, args.results)})"]
    if results[0]["settings"]["memory"]:
        lines.append(f"![peak memory vs n]({_relative(bench.memory_plot_path(str(args.plot)), args.results)})")
    return "\n".join(lines)


def _relative(path, results_path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(results_path).resolve().parent)


def main(argv=None):
    args, runs, forwarded = parse_arguments(argv)
    if args.calibrate_from:
        write_calibration(json.loads(args.calibrate_from.read_text()))
        return
    results = [bench.run(run_args) for run_args in runs]
    args.json.write_text(json.dumps(results, indent=1))
    bench.plot_times(results, str(args.plot))
    if results[0]["settings"]["memory"]:
        bench.plot_memory(results, bench.memory_plot_path(str(args.plot)))
    bench.write_results_section(args.results, SECTION, results_markdown(results, args, forwarded))
    print(f"wrote {args.results} (section {SECTION}), {args.plot}, {args.json}")
    if args.calibrate:
        write_calibration(results)


def write_calibration(results: list[dict]) -> None:
    calibration = bench.calibration_from(results)
    cost.CALIBRATION_PATH.write_text(json.dumps(calibration, indent=1) + "\n")
    summary = {key: calibration["cpu"][key] for key in ("non_causal", "causal", "shortest_crossover")}
    print(f"wrote {cost.CALIBRATION_PATH}: cpu {summary}")


if __name__ == "__main__":
    main()
