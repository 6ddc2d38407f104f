"""`lrcompile bench`: exact attention against the low-rank rewrite, timed side by side on this machine.

This module owns the speed and memory measurements (DESIGN.md, sections 7 and 8): the methods
compared, interleaved timing, peak memory measured in child processes, achieved FLOP rates from
the FLOP model (`lrcompile.cost`) against this machine's measured matmul rate, and the report
(table, log-log slopes, crossover with SDPA, JSON, plots).

    python -m lrcompile.bench --n 1024 2048 4096 --plot bench.png --json bench.json
    python -m lrcompile.bench --n 2048 8192 --methods sdpa lowrank --causal yes --memory

Methods, all computing attention of q, k, v (batch, heads, n, d) with the same inputs:

    sdpa              F.scaled_dot_product_attention (on CPU, its flash kernel)
    math              softmax(q k^T s + mask) v in eager PyTorch (materialises the n x n weights)
    inductor          the math spelling compiled by torch.compile(backend="inductor")
    lowrank           lrcompile.lowrank_attention, eager
    lowrank_compiled  the math spelling compiled by torch.compile(backend=lrcompile.backend(
                      Policy(cost_model=False))): rewritten to lowrank_attention, then Inductor

Timing: one process, methods round-robin within every repeat (so load drift hits all of them
alike), median of `--repeats` runs after `--warmup` runs. Each run is one training-mode step,
out = attend(q, k, v); out.backward(grad_out), timed at the end of the forward and at the end of
the backward: "forward" is the forward of a training step, "fwd+bwd" the whole step. Compilation
happens in the first warm-up run and is reported separately as the first call's time.

`add_arguments(parser)` and `run(args) -> dict` are the command-line interface (`lrcompile bench`).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lrcompile import cost, native
from lrcompile.attention import default_chunk_size, lowrank_attention
from lrcompile.compiler import compile_graph
from lrcompile.policy import Policy
from lrcompile.reference import random_attention_inputs

METHODS = ("sdpa", "math", "inductor", "lowrank", "lowrank_compiled")
LOWRANK_METHODS = ("lowrank", "lowrank_compiled")
COMPILED_METHODS = ("inductor", "lowrank_compiled")
DEFAULT_N = (1024, 2048, 4096, 8192, 16384, 32768)
# A cap on lowrank_compiled rows, to bound the full run's time. Since the op is a custom op its
# compile time no longer grows with n (3-15 s measured at n = 1024 and 4096), and its steps run
# the same chunked kernels as `lowrank`; rows beyond the cap are "skipped", never extrapolated.
DEFAULT_COMPILED_MAX_N = 16384
SLOPE_FROM_N = 4096  # below it, fixed per-call overheads bend the log-log line
MATMUL_SIZE = 2048
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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (compiled methods compile here)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"any of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory of forward+backward, one child process per row (slow)")
    parser.add_argument("--memory-budget-gib", type=float, default=4.0,
                        help="skip methods whose n x n float32 weights (all heads) exceed this")
    parser.add_argument("--compiled-max-n", type=int, default=DEFAULT_COMPILED_MAX_N,
                        help="largest n for lowrank_compiled, to bound the run time, default %(default)s")
    parser.add_argument("--matmul-size", type=int, default=MATMUL_SIZE,
                        help="the float32 matmul rate is timed on a size^3 torch.mm, default %(default)s")
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
        causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
        return cls(
            n=tuple(sorted(set(args.n))), batch=args.batch, heads=args.heads, head_dim=args.head_dim,
            degree=args.degree, score_range=args.score_range, repeats=args.repeats, warmup=args.warmup,
            methods=tuple(m for m in METHODS if m in args.methods), causal=causal, memory=args.memory,
            memory_budget_bytes=args.memory_budget_gib * GIB, compiled_max_n=args.compiled_max_n,
            matmul_size=args.matmul_size,
        )

    @property
    def policy(self) -> Policy:
        # cost_model=False: the benchmark measures the rewrite at every n, including where the
        # cost model would keep exact attention.
        return Policy(degree=self.degree, bound=self.score_range, cost_model=False, on_inaccurate="allow")

    def describe(self) -> str:
        return (f"batch {self.batch}, heads {self.heads}, d = {self.head_dim}, degree {self.degree} "
                f"(r = {math.comb(self.head_dim + self.degree, self.degree)}), float32, scores within "
                f"[-{self.score_range:g}, {self.score_range:g}]")


def run(args: argparse.Namespace) -> dict:
    """Time (and with --memory, measure) every method; print the report; write --json, --plot."""
    settings = Settings.from_args(args)
    progress_factory = progress_bar()
    print(f"lrcompile bench: {settings.describe()}", flush=True)
    print(f"  {machine_description()}", flush=True)
    matmul = measure_matmul_rate(settings.matmul_size)
    fused = {causal: inductor_fuses_math_attention(causal, settings.head_dim)
             for causal in settings.causal if "inductor" in settings.methods}
    rows = time_all(settings, fused, progress_factory)
    if settings.memory:
        measure_all_memory(settings, rows, progress_factory)
    result = summarise(settings, rows, matmul, fused)
    print(format_report(result), flush=True)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=1))
    if getattr(args, "plot", None):
        plot_times([result], args.plot)
        if settings.memory:
            plot_memory([result], memory_plot_path(args.plot))
    return result


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


def math_attention(q, k, v, is_causal: bool):
    """Exact attention as models spell it (nanoGPT's non-flash path): weights materialised."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, n_q, n_k)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=-1) @ v


class RewriteRecord:
    """How many attention sites the lrcompile backend rewrote in graphs that Inductor then compiled.

    So that a row labelled lowrank_compiled is known to run the low-rank op: when rewriting or
    compiling the rewritten graph fails, the backend falls back to the original graph (with a
    warning), and that graph's sites are not counted.
    """

    def __init__(self):
        self.rewritten_sites = 0

    def backend(self, policy: Policy):
        """lrcompile.backend(policy), plus the record."""
        from torch._inductor.compile_fx import compile_fx

        def lrcompile_recorded(gm, example_inputs):
            sites = []

            def inductor(graph_module, inputs):
                compiled = compile_fx(graph_module, inputs)
                if graph_module is not gm:  # the rewritten copy compiled
                    self.rewritten_sites += sum(sites)
                return compiled

            return compile_graph(gm, example_inputs, policy, inner=inductor,
                                 on_rewrite=lambda rewrite: sites.append(len(rewrite.rewritten)))
        return lrcompile_recorded


def make_method(method: str, settings: Settings, causal: bool, record: RewriteRecord | None = None) -> Callable:
    """attend(q, k, v) -> out for one method and mask. Compiled methods compile on first call."""
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if method == "math":
        return lambda q, k, v: math_attention(q, k, v, causal)
    if method == "lowrank":
        return lambda q, k, v: lowrank_attention(q, k, v, is_causal=causal, degree=settings.degree,
                                                 bound=settings.score_range)
    # dynamic=False: one static graph per n, as the policy decides per shape; with automatic
    # dynamic shapes a second n would turn the chunk loop symbolic.
    if method == "inductor":
        compiled = torch.compile(math_attention, backend="inductor", dynamic=False)
    elif method == "lowrank_compiled":
        record = record if record is not None else RewriteRecord()
        compiled = torch.compile(math_attention, backend=record.backend(settings.policy), dynamic=False)
    else:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    return lambda q, k, v: compiled(q, k, v, causal)


def weights_bytes(settings: Settings, n: int) -> int:
    """The n x n float32 attention weights for all heads: what math attention materialises."""
    return settings.batch * settings.heads * n * n * 4


def format_bytes(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"


def skip_reason(method: str, n: int, causal: bool, settings: Settings, fused: dict) -> str:
    """Why (method, n) is not measured, or "" when it is."""
    quadratic = method == "math" or (method == "inductor" and not fused.get(causal, False))
    if quadratic and weights_bytes(settings, n) > settings.memory_budget_bytes:
        return (f"skipped (needs {format_bytes(weights_bytes(settings, n))} for the n x n weights; "
                f"budget {format_bytes(settings.memory_budget_bytes)})")
    if method == "lowrank_compiled" and n > settings.compiled_max_n:
        return f"skipped (n > --compiled-max-n {settings.compiled_max_n})"
    return ""


def inductor_fuses_math_attention(causal: bool, head_dim: int) -> bool:
    """Whether Inductor's own pattern matcher (fuse_attention) turns the math spelling into SDPA.

    Then `inductor` runs SDPA's kernel and needs no n x n memory, so the memory budget does not
    apply to it. Probed once on a small shape; the counter is Inductor's record of replacements.
    Inductor's caches are off for the probe: a cache hit skips the pattern matcher and its counter.
    """
    import torch._functorch.config
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["inductor"]["fuse_attention"]
    q, k, v = (torch.randn(1, 2, 256, head_dim, requires_grad=True) for _ in range(3))
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(math_attention, backend="inductor", dynamic=False)(q, k, v, causal).sum().backward()
    torch._dynamo.reset()
    return counters["inductor"]["fuse_attention"] > before


# ---------------------------------------------------------------------------------------------
# Timing


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
    flops: float | None = None  # FLOP model (lrcompile.cost), forward + backward
    peak_bytes: int | None = None  # growth of peak RSS over forward + backward (--memory)
    memory_note: str = ""


def training_step_times(attend: Callable, q, k, v, grad_out) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of one step."""
    q.grad = k.grad = v.grad = None
    start = time.perf_counter()
    out = attend(q, k, v)
    forward_end = time.perf_counter()
    out.backward(grad_out)
    return forward_end - start, time.perf_counter() - start


def interleaved_runs(steps: dict[str, Callable[[], tuple[float, ...]]], warmup: int, repeats: int,
                     on_run: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run every step warmup + repeats times, round-robin, the starting step rotating each round.

    Rotation keeps any step from always following the same one (whose freed memory or cache state
    it would inherit). Returns {name: {"first": first call's times, "runs": [timed runs]}}.
    """
    names = list(steps)
    results = {name: {"first": None, "runs": []} for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times = steps[name]()
            if round_index == 0:
                results[name]["first"] = times
            if round_index >= warmup:
                results[name]["runs"].append(times)
            if on_run is not None:
                on_run(name)
    return results


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def attention_inputs(settings: Settings, n: int):
    """q, k, v (B, H, n, d) with scores within the stated range, and a fixed grad_out."""
    q, k, v = random_attention_inputs(settings.batch, settings.heads, n, n, settings.head_dim,
                                      score_range=settings.score_range, dtype=torch.float32, seed=n)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(n + 1))
    return q, k, v, grad_out


def time_configuration(settings: Settings, n: int, causal: bool, fused: dict, progress) -> list[Row]:
    """All methods at one (n, mask), interleaved."""
    torch._dynamo.reset()  # a fresh cache per shape: no recompile limits, no stale graphs
    rows = {m: Row(m, n, causal, skip_reason(m, n, causal, settings, fused)) for m in settings.methods}
    q, k, v, grad_out = attention_inputs(settings, n)
    records, steps = {}, {}
    for method, row in rows.items():
        if row.skipped:
            continue
        records[method] = RewriteRecord()
        attend = make_method(method, settings, causal, records[method])
        steps[method] = functools.partial(training_step_times, attend, q, k, v, grad_out)
    progress.set_postfix_str(f"n={n} {'causal' if causal else 'non-causal'}")
    results = interleaved_runs(steps, settings.warmup, settings.repeats, on_run=lambda name: progress.update())
    for method, measured in results.items():
        row = rows[method]
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
    return list(rows.values())


def time_all(settings: Settings, fused: dict, progress_factory) -> list[Row]:
    configurations = [(n, causal) for n in settings.n for causal in settings.causal]
    runs = sum(settings.warmup + settings.repeats
               for n, causal in configurations for m in settings.methods
               if not skip_reason(m, n, causal, settings, fused))
    rows = []
    with progress_factory(total=runs, desc="timing", unit="run") as progress:
        for n, causal in configurations:
            rows += time_configuration(settings, n, causal, fused, progress)
    return rows


def model_flops(method: str, n: int, causal: bool, settings: Settings) -> float:
    """Forward + backward FLOPs by the FLOP model: cost.exact_flops or cost.lowrank_flops."""
    batch_heads = settings.batch * settings.heads
    d = settings.head_dim
    if method in LOWRANK_METHODS:
        chunk = default_chunk_size(d, settings.degree, causal)  # what the op and the policy use
        return cost.lowrank_flops(n, n, d, d, batch_heads, causal, settings.degree, chunk)
    return cost.exact_flops(n, n, d, d, batch_heads, causal)


def measure_matmul_rate(size: int = MATMUL_SIZE, repeats: int = 5) -> dict:
    """This machine's float32 torch.mm rate (size^3 product), median of `repeats` after one warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        runs.append(time.perf_counter() - start)
    return {"size": size, "runs": runs, "gflops": 2 * size**3 / median(runs) / 1e9}


# ---------------------------------------------------------------------------------------------
# Peak memory, one child process per row (as benchmarks/peak_memory.py)


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """The process's peak resident set (VmHWM). Not ru_maxrss: that also keeps the peak recorded
    whenever a thread exits (Inductor's compile threads do), which reset_peak_rss cannot lower."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM line in /proc/self/status")


def reset_peak_rss() -> bool:
    """Lower the peak-RSS high-water mark to the current RSS (Linux >= 4.0, /proc/self/clear_refs).

    Lets a child compile at full size and then measure only the step. False where not allowed.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return peak_rss() <= current_rss() + (1 << 20)
    except OSError:
        return False


def peak_growth(step: Callable[[], None], warm_up: Callable[[], None]) -> tuple[int | None, str]:
    """Peak RSS growth of `step` after `warm_up`, or (None, why not)."""
    warm_up()
    gc.collect()
    if not reset_peak_rss():
        return None, "peak RSS cannot be reset here (/proc/self/clear_refs), so the warm-up's peak would count"
    before = current_rss()
    step()
    return peak_rss() - before, ""


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

    peak, note = peak_growth(step, warm_up)
    return {"peak_bytes": peak, "note": note, "input_bytes": 3 * q.numel() * q.element_size()}


def run_child(module_or_script: list[str], extra_args: list[str]) -> dict:
    """Run a child Python (`-m module` or a script path) and parse the JSON of its last line.

    glibc is told to mmap every buffer over 128 KiB separately, so freed buffers go back to the
    system instead of staying in the heap: the peak is then the step's own, rounded up to pages.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, *module_or_script, *extra_args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"peak_bytes": None, "note": f"child failed (exit {done.returncode}): {' | '.join(tail)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    """From which n the method stays faster than sdpa, from (n, time / sdpa time) sorted by n.

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


def summarise(settings: Settings, rows: list[Row], matmul: dict, fused: dict) -> dict:
    """Everything measured, plus what is derived from it: slopes, crossovers, FLOP-rate ratios."""
    measured = {(row.method, row.n, row.causal): row for row in rows if row.total_s is not None}
    chunk = {causal: default_chunk_size(settings.head_dim, settings.degree, causal) for causal in settings.causal}
    return {
        "settings": {**asdict(settings), "describe": settings.describe()},
        "machine": machine_info(),
        "matmul": matmul,
        "inductor_fuses_math_attention": {("causal" if c else "non-causal"): f for c, f in fused.items()},
        "rows": [asdict(row) for row in rows],
        "slopes": [slope_entry(measured, settings, method, causal, phase)
                   for causal in settings.causal for method in settings.methods for phase in PHASES],
        "crossovers": [crossover_entry(measured, settings, method, causal, phase)
                       for causal in settings.causal for method in _lowrank_against_sdpa(settings)
                       for phase in PHASES],
        "rate_ratios": [entry for causal in settings.causal for method in _lowrank_against_sdpa(settings)
                        if (entry := rate_ratio_entry(measured, settings, method, causal))],
        "predicted_crossovers": [
            {"causal": causal, "rate_ratio": cost.rate_ratio(causal),
             "n": cost.crossover_length(settings.head_dim, settings.head_dim, causal, settings.degree, chunk[causal])}
            for causal in settings.causal],
    }


PHASES = ("forward_s", "total_s")


def _lowrank_against_sdpa(settings: Settings) -> list[str]:
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


def calibration_from(results: list[dict], device_type: str = "cpu") -> dict:
    """The cost model's calibration implied by these runs (lrcompile.cost, calibration.json).

    For every low-rank method and mask kind, the rate ratio that puts the FLOP model's crossover at
    the measured fwd+bwd crossover with sdpa; per mask kind the smallest over methods and
    configurations, so the policy errs towards exact attention; and the shortest crossover of
    all, below which fixed per-call costs (which FLOPs miss) are left to decide for exact
    attention. Where the method was faster at every measured n, the smallest n stands in for the
    crossover (an upper bound: conservative).
    """
    evidence = []
    for result in results:
        settings = result["settings"]
        measured = {(r["method"], r["n"], r["causal"]): r for r in result["rows"] if r["total_s"] is not None}
        for causal in settings["causal"]:
            for method in LOWRANK_METHODS:
                ratios = [(n, measured[method, n, causal]["total_s"] / measured["sdpa", n, causal]["total_s"])
                          for n in settings["n"] if (method, n, causal) in measured and ("sdpa", n, causal) in measured]
                if not ratios:
                    continue
                found = crossover(ratios)
                n = found["n"] if found["n"] is not None else (ratios[0][0] if ratios[0][1] <= 1 else None)
                if n is None:
                    raise ValueError(f"{method}, {_mask(causal)}, d = {settings['head_dim']}: {found['text']}; "
                                     f"measure longer sequences (--n) to calibrate")
                chunk = default_chunk_size(settings["head_dim"], settings["degree"], causal)
                evidence.append({"method": method, "causal": causal, "head_dim": settings["head_dim"],
                                 "degree": settings["degree"], "measured_crossover": found["text"], "n": n,
                                 "ratio": cost.ratio_for_crossover(n, settings["head_dim"], settings["head_dim"],
                                                                   causal, settings["degree"], chunk)})
    if not evidence:
        raise ValueError("no low-rank method was measured against sdpa: nothing to calibrate")
    entry = {"machine": results[0]["machine"], "evidence": evidence,
             "shortest_crossover": math.ceil(min(e["n"] for e in evidence))}
    for causal in (False, True):
        ratios = [e["ratio"] for e in evidence if e["causal"] == causal]
        if ratios:
            entry["causal" if causal else "non_causal"] = min(ratios)
    missing = [key for key in ("non_causal", "causal") if key not in entry]
    if missing:
        raise ValueError(f"no measurement for {missing[0].replace('_', '-')} attention: run both (--causal both)")
    return {device_type: entry}


def rate_ratio_entry(measured: dict, settings: Settings, method: str, causal: bool) -> dict | None:
    """What cost.rate_ratio stands for: the low-rank path's achieved FLOP rate over exact attention's
    (sdpa), both by the FLOP model, fwd+bwd, at the largest n both were measured."""
    common = _both_measured(measured, settings, method, causal)
    if not common:
        return None
    low, exact = measured[method, common[-1], causal], measured["sdpa", common[-1], causal]
    return {"method": method, "causal": causal, "n": common[-1],
            "ratio": (low.flops / low.total_s) / (exact.flops / exact.total_s)}


# ---------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_kernels": native.status(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def machine_description() -> str:
    info = machine_info()
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), torch {info['torch']}, "
            f"{info['date']}; lrcompile CPU kernels: {info['cpu_kernels']}")


def _milliseconds(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(numerator, denominator):
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def table_lines(result: dict) -> list[str]:
    """The per-row table as Markdown (also readable on a terminal)."""
    rows = result["rows"]
    sdpa = {(r["n"], r["causal"]): r for r in rows if r["method"] == "sdpa" and r["total_s"] is not None}
    matmul_rate = result["matmul"]["gflops"]
    with_memory = result["settings"]["memory"]
    header = ["n", "mask", "method", "forward ms", "speed-up vs sdpa", "fwd+bwd ms", "speed-up vs sdpa",
              "GFLOP/s (model)", "of matmul rate", "first call s"] + (["peak MiB"] if with_memory else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["causal"], r["n"], METHODS.index(r["method"]))):
        mask = "causal" if r["causal"] else "non-causal"
        if r["skipped"]:
            cells = [str(r["n"]), mask, r["method"], r["skipped"]] + [""] * (len(header) - 4)
        else:
            base = sdpa.get((r["n"], r["causal"]), {})
            rate = r["flops"] / r["total_s"] / 1e9
            cells = [str(r["n"]), mask, r["method"], _milliseconds(r["forward_s"]),
                     _ratio(base.get("forward_s"), r["forward_s"]), _milliseconds(r["total_s"]),
                     _ratio(base.get("total_s"), r["total_s"]), f"{rate:.1f}", f"{rate / matmul_rate:.0%}",
                     "-" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"]
            if with_memory:
                cells.append("-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mask(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def format_report(result: dict) -> str:
    """The report as Markdown: what was measured, the table, slopes, crossovers, rate ratios."""
    settings = result["settings"]
    matmul = result["matmul"]
    lines = [
        f"Attention, {settings['describe']}. Median of {settings['repeats']} interleaved runs after "
        f"{settings['warmup']} warm-up; \"forward\" is the forward of a training step, \"fwd+bwd\" the whole "
        f"step; speed-up vs sdpa = sdpa's time / the method's, same run. Matmul rate (float32 torch.mm "
        f"{matmul['size']}^3, measured): **{matmul['gflops']:.1f} GFLOP/s**. GFLOP/s (model) = FLOPs of "
        f"forward + backward by the FLOP model (lrcompile.cost) / measured fwd+bwd time.",
        "",
        *table_lines(result),
        "",
        "- first call s: compile + one step (compiled methods).",
    ]
    for mask, fuses in result["inductor_fuses_math_attention"].items():
        lines.append(f"- inductor, {mask}: Inductor {'replaces' if fuses else 'does not replace'} the math spelling "
                     f"by SDPA (its fuse_attention pass){'' if fuses else ', so it materialises the n x n weights'}.")
    lines += [f"- {r['method']} n = {r['n']} {_mask(r['causal'])}: memory {r['memory_note']}"
              for r in result["rows"] if r["memory_note"]]
    lines += ["", *slope_table_lines(result), "", "Crossover with sdpa, measured: the n from which the method stays "
              "faster, interpolated in log-log between the measured points around it.", ""]
    for c in result["crossovers"]:
        phase = "fwd+bwd" if c["phase"] == "total_s" else "forward"
        lines.append(f"- {c['method']}, {_mask(c['causal'])}, {phase}: {c['text']}")
    for p in result["predicted_crossovers"]:
        ratio = "not calibrated" if p["rate_ratio"] is None else f"rate ratio {p['rate_ratio']:.3g}"
        lines.append(f"- predicted by the cost model in use (lrcompile.cost, {ratio}), {_mask(p['causal'])}, "
                     f"fwd+bwd: " + ("never" if p["n"] is None else f"n = {p['n']}"))
    if result["rate_ratios"]:
        lines += ["", "Achieved FLOP rate of low-rank over sdpa's (FLOP model / measured fwd+bwd time, at the "
                      "largest n both measured; the cost model's calibration is this ratio near the crossover):", ""]
        lines += [f"- {r['method']}, {_mask(r['causal'])}, n = {r['n']}: {r['ratio']:.2f}"
                  for r in result["rate_ratios"]]
    return "\n".join(lines)


def slope_table_lines(result: dict) -> list[str]:
    """Slope of log(time) vs log(n) per method, mask and phase, as a Markdown table."""
    settings = result["settings"]
    by_key = {(s["method"], s["causal"], s["phase"]): s for s in result["slopes"]}
    columns = [(causal, phase) for causal in settings["causal"] for phase in ("total_s", "forward_s")]
    header = ["method"] + [f"{_mask(c)} {'fwd+bwd' if p == 'total_s' else 'forward'}" for c, p in columns]
    lines = [f"Slope of log(time) vs log(n), least squares over the measured n >= {SLOPE_FROM_N} (2 = quadratic, "
             f"1 = linear; '-': fewer than two such n):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in settings["methods"]:
        cells = [method]
        for causal, phase in columns:
            entry = by_key[method, causal, phase]
            cells.append("-" if entry["slope"] is None else f"{entry['slope']:.2f} ({entry['points']} n)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def memory_plot_path(path: str) -> str:
    target = Path(path)
    return str(target.with_name(f"{target.stem}_memory{target.suffix or '.png'}"))


def plot_times(results: list[dict], path: str) -> None:
    """Forward+backward time vs n, log-log: one row of panels per configuration, one column per mask."""
    plot_lines(_panels(results, lambda r: r["total_s"]), path, "forward + backward (s)", _machine_title(results))


def plot_memory(results: list[dict], path: str) -> None:
    """Peak memory of forward+backward vs n, log-log, laid out as plot_times."""
    plot_lines(_panels(results, lambda r: None if r["peak_bytes"] is None else r["peak_bytes"] / GIB), path,
               "peak memory of fwd+bwd above inputs (GiB)", _machine_title(results))


def _panels(results, value):
    """[[(title, {method: [(n, value)]}) per mask] per configuration], skipped rows left out."""
    grid = []
    for result in results:
        settings, row_panels = result["settings"], []
        for causal in settings["causal"]:
            lines = {method: [(r["n"], value(r)) for r in result["rows"]
                              if r["method"] == method and r["causal"] == causal and not r["skipped"]
                              and value(r) is not None]
                     for method in settings["methods"]}
            title = (f"{'causal' if causal else 'non-causal'}, d = {settings['head_dim']}, "
                     f"degree {settings['degree']}, {settings['heads']} heads")
            row_panels.append((title, lines))
        grid.append(row_panels)
    return grid


def _machine_title(results):
    machine = results[0]["machine"]
    return f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}, {machine['date']}"


def plot_lines(grid: list[list[tuple[str, dict]]], path: str, ylabel: str, suptitle: str) -> None:
    """Log-log lines against sequence length n. grid[row][column] = (title, {label: [(n, y)]});
    a label keeps its colour in every panel."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'lrcompile[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for row in grid for _, lines in row for label in lines))
    columns = max(len(row) for row in grid)
    figure, axes = plt.subplots(len(grid), columns, figsize=(6 * columns, 4.2 * len(grid)), squeeze=False)
    for row_axes, row in zip(axes, grid):
        for axis, (title, lines) in zip(row_axes, row):
            for label, points in lines.items():
                if points:
                    axis.plot(*zip(*points), marker="o", label=label, color=f"C{labels.index(label)}")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("sequence length n")
            axis.set_ylabel(ylabel)
            axis.set_title(title)
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:
                axis.legend()
        for axis in row_axes[len(row):]:
            axis.set_visible(False)
    figure.suptitle(suptitle, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def progress_bar():
    """A factory of tqdm bars on stderr (the report goes to stdout), gone when finished."""
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("lrcompile bench needs tqdm for its progress bar: pip install 'lrcompile[bench]'") from None

    def factory(**kwargs):
        return tqdm(leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)
    return factory


def write_results_section(path: str | Path, section: str, markdown: str) -> None:
    """Replace the text between <!-- {section}:start --> and <!-- {section}:end --> in `path`
    (appending the section if its markers are missing), so each script owns one section."""
    path = Path(path)
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
