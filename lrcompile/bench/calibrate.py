"""`lrcompile calibrate`: measure where low-rank attention overtakes exact attention on this machine.

The cost model (lrcompile.compile.cost_model) predicts times as FLOPs / rate; what it cannot know is the
low-rank path's rate relative to exact attention's on this processor, with these threads, for
the kernel implementation that runs. This module measures it: a few short sequence lengths
around the crossover, low-rank against SDPA interleaved (lrcompile.bench, lrcompile.bench.timing),
forward + backward, both mask kinds; fits the rate ratio that puts the model's crossover where
the measured one is (`calibration_from`); and stores it, keyed by the machine, in the user's
cache (lrcompile.compile.calibration), where the policy finds it from then on.

    lrcompile calibrate                    # this CPU, under a minute
    lrcompile calibrate --device cuda      # the current CUDA device
    python -m lrcompile.bench.calibrate --heads 1

The fit, for every low-rank method and mask kind: the rate ratio at which the FLOP model's
crossover is the measured fwd+bwd crossover with sdpa; per mask kind the smallest over methods,
configurations and dtypes, so the policy errs towards exact attention; and the shortest crossover
of all, below which fixed per-call costs (which FLOPs miss) keep exact attention. Where the
method was faster at every measured n, the smallest n stands in for the crossover (an upper
bound: conservative). Where it was slower at every measured n, the ratio is the achieved FLOP-rate
ratio at the largest n (so the model predicts exact faster there too) and no rewrite is allowed
below that n.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch

from lrcompile.bench import command
from lrcompile.bench.methods import FORCED_KERNELS, LOWRANK_METHODS
from lrcompile.bench.report import mask_name
from lrcompile.bench.scaling import crossover
from lrcompile.bench.timing import progress_bar
from lrcompile.compile import calibration, cost_model
from lrcompile.compile.machine import describe_key
from lrcompile.ops import algorithm
from lrcompile.ops.attention import default_chunk_size

HEAD_DIM, DEGREE = 64, 2
SIZES = {"cpu": (1024, 2048, 4096, 8192, 16384), "cuda": (1024, 2048, 4096, 8192, 16384, 32768, 65536)}
HEADS = {"cuda": 16}  # CPU: one head per torch thread, the C sweep's unit of work
TIME_BUDGET_S = 45.0


def implementation_of(method: str, settings: dict) -> str:
    """The kernel implementation a low-rank method of a bench run ran (the key of its calibration),
    for saved runs from before bench recorded it ("implementations")."""
    if method in FORCED_KERNELS:
        return FORCED_KERNELS[method]
    return calibration.implementation_for(settings.get("device", "cpu"), settings["batch"] * settings["heads"])


def _key(result: dict, implementation: str) -> dict:
    """The machine key of a run, from what it recorded (a saved run may be fitted on another machine)."""
    device, machine = result["settings"].get("device", "cpu"), result["machine"]
    return {"device": device, "name": machine["gpu"] if device == "cuda" else machine["cpu"],
            "threads": machine["torch_threads"] if device == "cpu" else None, "implementation": implementation}


def calibration_from(results: list[dict]) -> list[dict]:
    """The calibrations implied by these bench runs: one entry per machine key (implementation),
    in lrcompile.compile.calibration's format."""
    evidence: dict[str, list] = {}
    keys, batch_heads = {}, {}
    for result in results:
        settings = result["settings"]
        measured = {(r["method"], r["n"], r["causal"]): r for r in result["rows"] if r["total_s"] is not None}
        for method in LOWRANK_METHODS:
            implementation = result.get("implementations", {}).get(method) or implementation_of(method, settings)
            for causal in settings["causal"]:
                common = [n for n in settings["n"] if (method, n, causal) in measured and ("sdpa", n, causal) in measured]
                if not common:
                    continue
                ratios = [(n, measured[method, n, causal]["total_s"] / measured["sdpa", n, causal]["total_s"])
                          for n in common]
                chunk = default_chunk_size(settings["head_dim"], settings["degree"], causal)
                found = crossover(ratios)
                if found["n"] is None and ratios[0][1] <= 1:
                    n, ratio = ratios[0][0], cost_model.ratio_for_crossover(ratios[0][0], settings["head_dim"],
                                                                      settings["head_dim"], causal, settings["degree"],
                                                                      chunk)
                elif found["n"] is None:
                    low, exact = measured[method, common[-1], causal], measured["sdpa", common[-1], causal]
                    n, ratio = common[-1], (low["flops"] / low["total_s"]) / (exact["flops"] / exact["total_s"])
                else:
                    n, ratio = found["n"], cost_model.ratio_for_crossover(found["n"], settings["head_dim"],
                                                                    settings["head_dim"], causal, settings["degree"],
                                                                    chunk)
                key = _key(result, implementation)
                name = describe_key(key)
                keys[name] = key
                batch_heads.setdefault(name, settings["batch"] * settings["heads"])
                evidence.setdefault(name, []).append({
                    "method": method, "causal": causal, "head_dim": settings["head_dim"],
                    "degree": settings["degree"], "dtype": settings.get("dtype", "float32"),
                    "measured_crossover": found["text"], "n": n, "ratio": ratio})
    if not evidence:
        raise ValueError("no low-rank method was measured against sdpa: nothing to calibrate")
    entries = []
    for name, items in evidence.items():
        entry = {"key": keys[name], "measured_on": results[0]["machine"], "batch_heads": batch_heads[name],
                 "shortest_crossover": math.ceil(min(e["n"] for e in items)), "evidence": items}
        for causal in (False, True):
            ratios = [e["ratio"] for e in items if e["causal"] == causal]
            if ratios:
                entry["causal" if causal else "non_causal"] = min(ratios)
        missing = [mask for mask in ("non_causal", "causal") if mask not in entry]
        if missing:
            raise ValueError(f"{name}: no measurement for {missing[0].replace('_', '-')} attention: "
                             f"run both masks (--causal both)")
        entries.append(entry)
    return entries


def measure(device: str = "cpu", heads: int | None = None, batch: int = 1, sizes: tuple[int, ...] | None = None,
            repeats: int = 3, time_budget_s: float = TIME_BUDGET_S, progress_factory=None) -> dict:
    """A bench run of sdpa against lowrank at growing n, both masks, until low-rank is faster in
    both, or the next length would overrun the time budget: a result for `calibration_from`."""
    heads = heads or HEADS.get(device) or torch.get_num_threads()
    sizes = sizes or SIZES[device]
    settings = command.Settings(n=tuple(sizes), batch=batch, heads=heads, head_dim=HEAD_DIM, degree=DEGREE,
                              score_range=1.0, repeats=repeats, warmup=1, methods=("sdpa", "lowrank"),
                              causal=(False, True), memory=False, memory_budget_bytes=math.inf,
                              compiled_max_n=max(sizes), device=device,
                              dtype="bfloat16" if device == "cuda" else "float32")
    progress_factory = progress_factory or progress_bar()
    start, rows, measured_n = time.perf_counter(), [], []
    # the factored algorithm, whose FLOPs the cost model counts: the op would compute the shorter
    # lengths directly (lrcompile.ops.algorithm), a different algorithm at a different rate
    with progress_factory(total=len(sizes) * 2 * 2 * (repeats + 1), desc="calibrating", unit="run") as progress, \
            algorithm.algorithm_forced("factored"):
        for n in sizes:
            started = time.perf_counter()
            configuration = [row for causal in settings.causal
                             for row in command.time_configuration(settings, n, causal, {}, progress)]
            # doubling n quadruples exact attention's time and doubles low-rank's: about 3x in all
            next_length_s = 3 * (time.perf_counter() - started)
            rows += configuration
            measured_n.append(n)
            failed = [row.skipped for row in configuration if row.skipped]
            if failed:
                raise RuntimeError(f"calibration could not time the low-rank path: {failed[0]}")
            if _faster_in_both_masks(configuration) or time.perf_counter() - start + next_length_s > time_budget_s:
                break
    settings = dataclasses.replace(settings, n=tuple(measured_n))
    result = command.summarise(settings, rows, matmul=None, fused={})
    result["seconds"] = time.perf_counter() - start
    return result


def _faster_in_both_masks(rows) -> bool:
    times = {(row.method, row.causal): row.total_s for row in rows}
    return all(times["lowrank", causal] < times["sdpa", causal] for causal in (False, True))


def calibrate(device: str = "cpu", heads: int | None = None, batch: int = 1, path=None, **measure_kwargs) -> tuple[dict, str]:
    """Measure this machine, store its calibration (user cache, or `path`); return (entry, path)."""
    result = measure(device, heads, batch, **measure_kwargs)
    (entry,) = calibration_from([result])
    entry["seconds"] = round(result["seconds"], 1)
    written = calibration.save(entry, path)
    return entry, str(written)


def summary(entry: dict, path: str) -> str:
    lines = [f"calibrated {describe_key(entry['key'])} in {entry.get('seconds', '?')} s; wrote {path}"]
    for e in entry["evidence"]:
        lines.append(f"  {e['method']}, {mask_name(e['causal'])}: crossover with SDPA {e['measured_crossover']}")
    lines.append(f"  rate ratio {entry['non_causal']:.3g} non-causal, {entry['causal']:.3g} causal; exact attention "
                 f"kept below n = {entry['shortest_crossover']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--heads", type=int, default=None,
                        help="heads per call measured (default: CPU one per torch thread, CUDA 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=TIME_BUDGET_S,
                        help="stop adding longer sequences after this many seconds, default %(default)s")
    parser.add_argument("--n", type=int, nargs="+", default=None, metavar="N",
                        help="sequence lengths tried, shortest first (default: CPU 1024..16384, CUDA 1024..65536)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method and length")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lrcompile calibrate --device cuda: torch sees no CUDA device here")
    print(f"lrcompile calibrate: timing low-rank against SDPA on {args.device} (under a minute)", flush=True)
    entry, path = calibrate(args.device, args.heads, args.batch, time_budget_s=args.budget_s,
                            sizes=tuple(sorted(args.n)) if args.n else None, repeats=args.repeats)
    print(summary(entry, path), flush=True)
    return entry


def main(argv=None) -> None:
    run(add_arguments(argparse.ArgumentParser(prog="python -m lrcompile.bench.calibrate", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
