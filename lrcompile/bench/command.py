"""`lrcompile bench`: exact attention against the low-rank rewrite, timed side by side on this machine.

This module owns how a run is put together (docs/design.md, section 8): its settings, one
configuration's rows, the summary (slopes, crossovers, rate ratios). The methods compared are
lrcompile.bench.methods; how steps are timed lrcompile.bench.timing; peak memory
lrcompile.bench.peak_memory; the Markdown report lrcompile.bench.report; plots lrcompile.bench.plots.

    python -m lrcompile.bench --n 1024 2048 4096 --plot results/bench.png --json results/bench.json
    python -m lrcompile.bench --n 2048 8192 --methods sdpa lowrank --causal yes --memory
    python -m lrcompile.bench --device cuda --dtype bfloat16 --methods sdpa inductor lowrank_triton lowrank_torch

Methods, all computing attention of q, k, v (batch, heads, n, d) with the same inputs:

    sdpa              F.scaled_dot_product_attention (on CPU its flash kernel; on CUDA flash for 16-bit)
    math              softmax(q k^T s + mask) v in eager PyTorch (materialises the n x n weights)
    inductor          the math spelling compiled by torch.compile(backend="inductor")
    lowrank           lrcompile.lowrank_attention, eager, with the implementation lrcompile chooses
    lowrank_compiled  the math spelling compiled by torch.compile(backend=lrcompile.backend(
                      Policy(cost_model=False))): rewritten to lowrank_attention, then Inductor
    lowrank_torch     lowrank, with LRCOMPILE_KERNELS=torch around the step: the torch sweep
    lowrank_triton    lowrank, with LRCOMPILE_KERNELS=triton around the step (CUDA only)

Timing: one process, methods round-robin within every repeat (lrcompile.bench.timing), median of
`--repeats` runs after `--warmup` runs. Each run is one training-mode step, out = attend(q, k, v);
out.backward(grad_out), timed at the end of the forward and at the end of the backward: "forward"
is the forward of a training step, "fwd+bwd" the whole step. Compilation happens in the first
warm-up run and is reported separately as the first call's time. A method that fails (a missing
kernel, out of memory) is reported as a skipped row with its error; the others go on.

`add_arguments(parser)` and `run(args) -> dict` are the command-line interface (`lrcompile bench`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lrcompile.bench.machine import machine_description, machine_info
from lrcompile.bench.methods import COMPILED_METHODS, DEFAULT_METHODS, DTYPES, FORCED_KERNELS, LOWRANK_METHODS, \
    METHODS, RewriteRecord, failure_tolerant, inductor_fuses_math_attention, make_method, with_forced_kernels
from lrcompile.bench.peak_memory import peak_growth, run_child
from lrcompile.bench.plots import memory_plot_path, plot_memory, plot_times
from lrcompile.bench.report import SLOPE_FROM_N, format_report
from lrcompile.bench.scaling import crossover, loglog_slope
from lrcompile.bench.timing import MATMUL_SIZE, interleaved_runs, measure_matmul_rate, median, progress_bar, \
    training_step_times
from lrcompile.compile import calibration, cost_model
from lrcompile.compile.policy import Policy
from lrcompile.math import flops
from lrcompile.ops.attention import default_chunk_size
from lrcompile.reference import random_attention_inputs

DEFAULT_N = (1024, 2048, 4096, 8192, 16384, 32768)
# A cap on lowrank_compiled rows, to bound the full run's time. Since the op is a custom op its
# compile time no longer grows with n (3-15 s measured at n = 1024 and 4096), and its steps run
# the same chunked kernels as `lowrank`; rows beyond the cap are "skipped", never extrapolated.
DEFAULT_COMPILED_MAX_N = 16384
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `lrcompile bench` (and of `python -m lrcompile.bench`)."""
    parser.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_N), metavar="N",
                        help="sequence lengths (n_q = n_k), default %(default)s")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--degree", type=int, default=2, help="polynomial degree of the low-rank methods")
    parser.add_argument("--score-range", type=float, default=1.0,
                        help="inputs have scores within [-B, B]; the polynomial is built for this B")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (compiled methods compile here)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS, metavar="METHOD",
                        help=f"any of {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory of forward+backward, one child process per row (slow; CPU)")
    parser.add_argument("--memory-budget-gib", type=float, default=4.0,
                        help="skip methods whose n x n float32 weights (all heads) exceed this")
    parser.add_argument("--compiled-max-n", type=int, default=DEFAULT_COMPILED_MAX_N,
                        help="largest n for lowrank_compiled, to bound the run time, default %(default)s")
    parser.add_argument("--matmul-size", type=int, default=MATMUL_SIZE,
                        help="the matmul rate is timed on a size^3 torch.mm of --dtype, default %(default)s")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no further configuration (n, mask) after this many seconds of timing; the rest are "
                             "reported as skipped (keeps a run on a lent device within its time)")
    parser.add_argument("--plot", metavar="PATH", help="PNG of time vs n (and PATH_memory.png with --memory)")
    parser.add_argument("--json", metavar="PATH", help="all raw numbers as JSON")
    return parser


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration, checked."""

    n: tuple[int, ...]
    batch: int
    heads: int
    head_dim: int
    degree: int
    score_range: float
    repeats: int
    warmup: int
    methods: tuple[str, ...]
    causal: tuple[bool, ...]
    memory: bool
    memory_budget_bytes: float
    compiled_max_n: int
    matmul_size: int = MATMUL_SIZE
    time_limit_s: float | None = None
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        for name in ("batch", "heads", "head_dim", "degree", "repeats", "compiled_max_n", "matmul_size"):
            value = getattr(args, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if any(n < 1 for n in args.n):
            raise ValueError(f"--n takes positive sequence lengths, got {args.n}")
        if args.warmup < 1:
            raise ValueError(f"--warmup must be at least 1 (compiled methods compile in it), got {args.warmup}")
        if not args.score_range > 0:
            raise ValueError(f"--score-range must be positive, got {args.score_range}")
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; accepted: {', '.join(METHODS)}")
        device, dtype = getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here")
        if args.memory and device != "cpu":
            raise ValueError(f"--memory measures the CPU's resident memory; got --device {device}")
        causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
        return cls(
            n=tuple(sorted(set(args.n))), batch=args.batch, heads=args.heads, head_dim=args.head_dim,
            degree=args.degree, score_range=args.score_range, repeats=args.repeats, warmup=args.warmup,
            methods=tuple(m for m in METHODS if m in args.methods), causal=causal, memory=args.memory,
            memory_budget_bytes=args.memory_budget_gib * GIB, compiled_max_n=args.compiled_max_n,
            matmul_size=args.matmul_size, device=device, dtype=dtype,
            time_limit_s=getattr(args, "time_limit_s", None),
        )

    @property
    def policy(self) -> Policy:
        # cost_model=False: the benchmark measures the rewrite at every n, including where the
        # cost model would keep exact attention.
        return Policy(degree=self.degree, bound=self.score_range, cost_model=False, on_inaccurate="allow")

    def describe(self) -> str:
        return (f"batch {self.batch}, heads {self.heads}, d = {self.head_dim}, degree {self.degree} "
                f"(r = {math.comb(self.head_dim + self.degree, self.degree)}), {self.dtype} on {self.device}, "
                f"scores within [-{self.score_range:g}, {self.score_range:g}]")


def run(args: argparse.Namespace) -> dict:
    """Time (and with --memory, measure) every method; print the report; write --json, --plot."""
    settings = Settings.from_args(args)
    progress_factory = progress_bar()
    print(f"lrcompile bench: {settings.describe()}", flush=True)
    print(f"  {machine_description(settings.device)}", flush=True)
    result = measure(settings, progress_factory)
    print(format_report(result), flush=True)
    for output in (getattr(args, "json", None), getattr(args, "plot", None)):
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=1))
    if getattr(args, "plot", None):
        plot_times([result], args.plot)
        if settings.memory:
            plot_memory([result], memory_plot_path(args.plot))
    return result


def measure(settings: Settings, progress_factory) -> dict:
    """Every row of `settings` timed (and with settings.memory, measured), summarised; nothing printed."""
    matmul = measure_matmul_rate(settings.matmul_size, device=settings.device, dtype=DTYPES[settings.dtype])
    fused = {causal: inductor_fuses_math_attention(causal, settings)
             for causal in settings.causal if "inductor" in settings.methods}
    rows = time_all(settings, fused, progress_factory)
    if settings.memory:
        measure_all_memory(settings, rows, progress_factory)
    return summarise(settings, rows, matmul, fused)


def main(argv: list[str] | None = None) -> None:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m lrcompile.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # one memory row, run by measure_all_memory
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(peak_memory_row(**json.loads(args.memory_child))))
        return
    run(args)


# ---------------------------------------------------------------------------------------------
# The methods


def weights_bytes(settings: Settings, n: int) -> int:
    """The n x n float32 attention weights for all heads: what math attention materialises."""
    return settings.batch * settings.heads * n * n * 4


def format_bytes(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"


def skip_reason(method: str, n: int, causal: bool, settings: Settings, fused: dict) -> str:
    """Why (method, n) is not measured, or "" when it is."""
    if method == "lowrank_triton" and settings.device != "cuda":
        return f"skipped (the Triton kernels run on CUDA; this run is on {settings.device})"
    if method == "lowrank_triton" and importlib.util.find_spec("lrcompile.kernels.selector") is None:
        # without the implementation selector LRCOMPILE_KERNELS is ignored: the row would time the torch sweep
        return "skipped (this build has no implementation selector, lrcompile.kernels.selector, to run the Triton kernels)"
    quadratic = method == "math" or (method == "inductor" and not fused.get(causal, False))
    if quadratic and weights_bytes(settings, n) > settings.memory_budget_bytes:
        return (f"skipped (needs {format_bytes(weights_bytes(settings, n))} for the n x n weights; "
                f"budget {format_bytes(settings.memory_budget_bytes)})")
    if method == "lowrank_compiled" and n > settings.compiled_max_n:
        return f"skipped (n > --compiled-max-n {settings.compiled_max_n})"
    return ""


# ---------------------------------------------------------------------------------------------
# Timing one configuration


@dataclass
class Row:
    """One (method, n, mask): medians and every run, in seconds; peak memory in bytes."""

    method: str
    n: int
    causal: bool
    skipped: str = ""
    forward_s: float | None = None
    total_s: float | None = None  # forward + backward
    forward_runs: list[float] = field(default_factory=list)
    total_runs: list[float] = field(default_factory=list)
    first_call_s: float | None = None  # compiled methods: compile + one step
    flops: float | None = None  # FLOP model (lrcompile.math.flops), forward + backward
    product_flops: float | None = None  # low-rank methods: the state products alone (flops.lowrank_product_flops)
    bytes: float | None = None  # least memory traffic of forward + backward by the byte model (flops.*_bytes)
    peak_bytes: int | None = None  # growth of peak RSS over forward + backward (--memory)
    memory_note: str = ""


def attention_inputs(settings: Settings, n: int):
    """q, k, v (B, H, n, d) with scores within the stated range, and a fixed grad_out."""
    q, k, v = random_attention_inputs(settings.batch, settings.heads, n, n, settings.head_dim,
                                      score_range=settings.score_range, dtype=torch.float32, seed=n,
                                      requires_grad=False)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(n + 1))
    dtype = DTYPES[settings.dtype]
    q, k, v = (t.to(settings.device, dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, grad_out.to(settings.device, dtype)


def time_configuration(settings: Settings, n: int, causal: bool, fused: dict, progress) -> list[Row]:
    """All methods at one (n, mask), interleaved; each run advances `progress` by its GFLOP."""
    if settings.device == "cpu":
        torch._dynamo.reset()  # a fresh cache per shape: no recompile limits, no stale graphs
    rows = {m: Row(m, n, causal, skip_reason(m, n, causal, settings, fused)) for m in settings.methods}
    q, k, v, grad_out = attention_inputs(settings, n)
    records, steps, failures = {}, {}, {}
    for method, row in rows.items():
        if row.skipped:
            continue
        records[method] = RewriteRecord()
        attend = make_method(method, settings, causal, records[method])
        step = functools.partial(training_step_times, attend, q, k, v, grad_out)
        if method in FORCED_KERNELS:
            step = with_forced_kernels(FORCED_KERNELS[method], step)
        steps[method] = failure_tolerant(step, failures, method)
    progress.set_postfix_str(f"n={n} {'causal' if causal else 'non-causal'}")
    gflop = {method: model_flops(method, n, causal, settings) / 1e9 for method in steps}
    results = interleaved_runs(steps, settings.warmup, settings.repeats,
                               on_run=lambda name: progress.update(gflop[name]))
    for method, measured in results.items():
        row = rows[method]
        if method in failures:
            row.skipped = f"failed: {failures[method]}"
            continue
        if method == "lowrank_compiled" and records[method].rewritten_sites == 0:
            row.skipped = "not measured: lrcompile kept exact attention (see its warning)"
            continue
        row.forward_runs = [forward for forward, _ in measured["runs"]]
        row.total_runs = [total for _, total in measured["runs"]]
        row.forward_s, row.total_s = median(row.forward_runs), median(row.total_runs)
        if method in COMPILED_METHODS:
            row.first_call_s = measured["first"][1]
    for row in rows.values():
        row.flops = model_flops(row.method, n, causal, settings)
        row.bytes = model_bytes(row.method, n, settings)
        if row.method in LOWRANK_METHODS:
            chunk = default_chunk_size(settings.head_dim, settings.degree, causal)
            row.product_flops = flops.lowrank_product_flops(n, n, settings.head_dim, settings.head_dim,
                                                           settings.batch * settings.heads, causal,
                                                           settings.degree, chunk)
    return list(rows.values())


def time_all(settings: Settings, fused: dict, progress_factory) -> list[Row]:
    configurations = [(n, causal) for n in settings.n for causal in settings.causal]
    timed = [(m, n, causal) for n, causal in configurations for m in settings.methods
             if not skip_reason(m, n, causal, settings, fused)]
    runs = settings.warmup + settings.repeats
    # Runs at long n cost far more than at short n: the bar counts GFLOP, not runs, so that its
    # estimate of the time left does not stay optimistic until the longest rows start.
    total = sum(runs * model_flops(m, n, causal, settings) for m, n, causal in timed) / 1e9
    print(f"  {len(timed) * runs} timed runs over {len(configurations)} configurations (n, mask), "
          f"{total:,.0f} GFLOP in all; the bar's time estimate weighs each run by its FLOPs"
          + (f"; no configuration starts after {settings.time_limit_s:g} s" if settings.time_limit_s else ""),
          flush=True)
    rows, start = [], time.perf_counter()
    with progress_factory(total=total, desc="timing", unit="GFLOP", unit_scale=False) as progress:
        for n, causal in configurations:
            if rows and settings.time_limit_s is not None and time.perf_counter() - start > settings.time_limit_s:
                rows += [Row(m, n, causal, f"skipped (--time-limit-s {settings.time_limit_s:g} reached)")
                         for m in settings.methods]
                continue
            rows += time_configuration(settings, n, causal, fused, progress)
    return rows


def model_flops(method: str, n: int, causal: bool, settings: Settings) -> float:
    """Forward + backward FLOPs by the FLOP model: flops.exact_flops or flops.lowrank_flops."""
    batch_heads = settings.batch * settings.heads
    d = settings.head_dim
    if method in LOWRANK_METHODS:
        chunk = default_chunk_size(d, settings.degree, causal)  # what the op and the policy use
        return flops.lowrank_flops(n, n, d, d, batch_heads, causal, settings.degree, chunk)
    return flops.exact_flops(n, n, d, d, batch_heads, causal)


def model_bytes(method: str, n: int, settings: Settings) -> float:
    """Least memory traffic of forward + backward by the byte model: flops.exact_bytes or flops.lowrank_bytes."""
    batch_heads, d, size = settings.batch * settings.heads, settings.head_dim, DTYPES[settings.dtype].itemsize
    if method in LOWRANK_METHODS:
        return flops.lowrank_bytes(n, n, d, d, batch_heads, settings.degree, size)
    return flops.exact_bytes(n, n, d, d, batch_heads, size)


# ---------------------------------------------------------------------------------------------
# Peak memory, one child process per row (lrcompile.bench.peak_memory)


def peak_memory_row(method, n, causal, batch, heads, head_dim, degree, score_range, compiled_max_n) -> dict:
    """Child process: peak memory of one forward+backward above the inputs.

    Eager methods warm up on a small shape (libraries, polynomial and index tables); compiled
    methods compile at the measured shape, after which the peak is reset.
    """
    settings = Settings(n=(n,), batch=batch, heads=heads, head_dim=head_dim, degree=degree,
                        score_range=score_range, repeats=1, warmup=1, methods=(method,), causal=(causal,),
                        memory=True, memory_budget_bytes=math.inf, compiled_max_n=compiled_max_n)
    attend = make_method(method, settings, causal)
    q, k, v, grad_out = attention_inputs(settings, n)

    def step():
        training_step_times(attend, q, k, v, grad_out)

    def warm_up():
        if method in COMPILED_METHODS:
            step()
        else:
            small = attention_inputs(settings, 256)
            training_step_times(attend, *small)
        q.grad = k.grad = v.grad = None

    if method in FORCED_KERNELS:
        step, warm_up = (with_forced_kernels(FORCED_KERNELS[method], f) for f in (step, warm_up))
    peak, note = peak_growth(step, warm_up)
    return {"peak_bytes": peak, "note": note, "input_bytes": 3 * q.numel() * q.element_size()}


def measure_all_memory(settings: Settings, rows: list[Row], progress_factory) -> None:
    measured = [row for row in rows if not row.skipped]
    with progress_factory(total=len(measured), desc="memory", unit="row") as progress:
        for row in measured:
            progress.set_postfix_str(f"{row.method} n={row.n} {'causal' if row.causal else 'non-causal'}")
            spec = dict(method=row.method, n=row.n, causal=row.causal, batch=settings.batch, heads=settings.heads,
                        head_dim=settings.head_dim, degree=settings.degree, score_range=settings.score_range,
                        compiled_max_n=settings.compiled_max_n)
            child = run_child(["-m", "lrcompile.bench"], ["--memory-child", json.dumps(spec)])
            row.peak_bytes, row.memory_note = child["peak_bytes"], child.get("note", "")
            progress.update()


# ---------------------------------------------------------------------------------------------
# Summary: ratios, slopes, crossovers


PHASES = ("forward_s", "total_s")


def summarise(settings: Settings, rows: list[Row], matmul: dict, fused: dict) -> dict:
    """Everything measured, plus what is derived from it: slopes, crossovers, FLOP-rate ratios."""
    measured = {(row.method, row.n, row.causal): row for row in rows if row.total_s is not None}
    chunk = {causal: default_chunk_size(settings.head_dim, settings.degree, causal) for causal in settings.causal}
    batch_heads = settings.batch * settings.heads
    in_use = calibration.lookup(settings.device, calibration.implementation_for(settings.device, batch_heads))
    ratio = {causal: None if in_use.calibration is None else in_use.calibration.rate_ratio(causal, batch_heads)
             for causal in settings.causal}
    shortest = {causal: 0 if in_use.calibration is None else in_use.calibration.shortest_crossover_for(causal)
                for causal in settings.causal}
    return {
        "settings": {**asdict(settings), "describe": settings.describe()},
        "machine": machine_info(settings.device),
        "matmul": matmul,
        "inductor_fuses_math_attention": {("causal" if c else "non-causal"): f for c, f in fused.items()},
        "rows": [asdict(row) for row in rows],
        "slopes": [slope_entry(measured, settings, method, causal, phase)
                   for causal in settings.causal for method in settings.methods for phase in PHASES],
        "crossovers": [crossover_entry(measured, settings, method, causal, phase)
                       for causal in settings.causal for method in lowrank_against_sdpa(settings)
                       for phase in PHASES],
        "rate_ratios": [entry for causal in settings.causal for method in lowrank_against_sdpa(settings)
                        if (entry := rate_ratio_entry(measured, settings, method, causal))],
        "calibration": in_use.description,
        # the kernel implementation each low-rank method ran: what a calibration from this run is keyed by
        "implementations": {m: FORCED_KERNELS.get(m) or calibration.implementation_for(settings.device, batch_heads)
                            for m in settings.methods if m in LOWRANK_METHODS},
        "predicted_crossovers": [
            {"causal": causal, "rate_ratio": ratio[causal],
             "n": cost_model.crossover_length(settings.head_dim, settings.head_dim, causal, settings.degree,
                                              chunk[causal], ratio=ratio[causal], shortest_crossover=shortest[causal])}
            for causal in settings.causal],
    }


def lowrank_against_sdpa(settings: Settings) -> list[str]:
    return [m for m in LOWRANK_METHODS if m in settings.methods and "sdpa" in settings.methods]


def slope_entry(measured: dict, settings: Settings, method: str, causal: bool, phase: str) -> dict:
    points = [(n, getattr(measured[method, n, causal], phase)) for n in settings.n
              if n >= SLOPE_FROM_N and (method, n, causal) in measured]
    return {"method": method, "causal": causal, "phase": phase, "points": len(points),
            "slope": loglog_slope(points)}


def _both_measured(measured: dict, settings: Settings, method: str, causal: bool) -> list[int]:
    return [n for n in settings.n if (method, n, causal) in measured and ("sdpa", n, causal) in measured]


def crossover_entry(measured: dict, settings: Settings, method: str, causal: bool, phase: str) -> dict:
    ratios = [(n, getattr(measured[method, n, causal], phase) / getattr(measured["sdpa", n, causal], phase))
              for n in _both_measured(measured, settings, method, causal)]
    return {"method": method, "causal": causal, "phase": phase, **crossover(ratios)}


def rate_ratio_entry(measured: dict, settings: Settings, method: str, causal: bool) -> dict | None:
    """What a calibration's rate ratio stands for: the low-rank path's achieved FLOP rate over exact
    attention's (sdpa), both by the FLOP model, fwd+bwd, at the largest n both were measured."""
    common = _both_measured(measured, settings, method, causal)
    if not common:
        return None
    low, exact = measured[method, common[-1], causal], measured["sdpa", common[-1], causal]
    return {"method": method, "causal": causal, "n": common[-1],
            "ratio": (low.flops / low.total_s) / (exact.flops / exact.total_s)}


if __name__ == "__main__":
    main()
