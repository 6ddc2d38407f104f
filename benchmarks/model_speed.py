"""Training-step time and peak memory of a 4-layer GPT, Inductor against lrcompile, versus n.

The model is lrcompile.models.build() (nanoGPT's architecture: n_embd 256, 4 heads of d = 64, causal
attention through F.scaled_dot_product_attention, byte vocabulary). One training step is forward,
cross-entropy loss, backward and an AdamW step, batch 1. Two copies of the same initial model,
each with its own optimizer, compiled with dynamic=False by

    inductor            torch.compile(model, backend="inductor")
    lrcompile           torch.compile(model, backend=lrcompile.backend(Policy(cost_model=False))):
                        every attention site rewritten, whatever n
    lrcompile_default   torch.compile(model, backend="lrcompile"): the default policy, whose
                        calibrated cost model keeps exact attention below the crossover

are stepped round-robin in one process (as lrcompile.bench does for the op); the median of
--repeats steps after --warmup steps (the first compiles) is reported, with the speed-up of
lrcompile over Inductor in the same run. With --memory, each (method, n) also runs in a child
process that compiles and steps once at full size, resets the peak RSS, and measures one more step:
the peak above the model, its optimizer state and the inputs.

    python benchmarks/model_speed.py            # n = 512 .. 8192: about 15 minutes on 2 cores
    python benchmarks/model_speed.py --memory   # plus peak memory (about 10 minutes more)
    python benchmarks/model_speed.py --n 256 512 --repeats 1 --results /tmp/R.md --plot /tmp/m.png --json /tmp/m.json
    python benchmarks/model_speed.py --device cuda          # n = 2048, 8192, 32768, bfloat16 autocast

On CUDA a step is timed with CUDA events (lrcompile.bench.timing), --dtype bfloat16 runs it under
autocast, and the section, plot and JSON get a _cuda suffix; --memory (resident memory) is CPU only.

Writes the model-speed section of benchmarks/RESULTS.md, benchmarks/model_speed.png and
benchmarks/model_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lrcompile.bench import methods
from lrcompile.bench.machine import machine_description, machine_info
from lrcompile.bench.peak_memory import peak_growth, run_child
from lrcompile.bench.plots import GIB, memory_plot_path, plot_lines
from lrcompile.bench.results import write_results_section
from lrcompile.bench.scaling import crossover, loglog_slope
from lrcompile.bench.timing import StepClock, interleaved_runs, median, progress_bar
from lrcompile.models import build
from lrcompile.compile.policy import Policy

HERE = Path(__file__).resolve().parent

SECTION = {"cpu": "model-speed", "cuda": "model-speed-cuda"}
METHODS = ("inductor", "lrcompile", "lrcompile_default")
DEFAULT_N = (512, 1024, 2048, 4096, 8192)
# On CUDA every n compiles three models: three lengths keep the run to a few minutes.
CUDA_DEFAULT_N = (2048, 8192, 32768)
SLOPE_FROM_N = 2048


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=None, metavar="N",
                        help=f"default CPU {' '.join(map(str, DEFAULT_N))}, CUDA {' '.join(map(str, CUDA_DEFAULT_N))}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="bfloat16: the step under autocast (default: CPU float32, CUDA bfloat16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--degree", type=int, default=2, help="polynomial degree of the lrcompile rewrite")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles)")
    parser.add_argument("--lowrank-max-n", type=int, default=None,
                        help="largest n compiled with lrcompile, to bound the run time, default %(default)s")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, one child process per row")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=None, help="default benchmarks/model_speed[_cuda].png")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/model_speed[_cuda].json")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.n = args.n or list(CUDA_DEFAULT_N if cuda else DEFAULT_N)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.lowrank_max_n = args.lowrank_max_n or max(args.n)
    args.plot = args.plot or HERE / f"model_speed{'_cuda' if cuda else ''}.png"
    args.json = args.json or HERE / f"model_speed{'_cuda' if cuda else ''}.json"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if cuda and args.memory:
        parser.error("--memory measures the CPU's resident memory; it is not available with --device cuda")
    for name in ("batch", "n_layer", "n_embd", "n_head", "vocab_size", "degree", "repeats", "warmup", "lowrank_max_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if any(n < 1 for n in args.n):
        parser.error(f"--n takes positive sequence lengths, got {args.n}")
    args.n = sorted(set(args.n))
    return args


# ---------------------------------------------------------------------------------------------
# One training step


@dataclass
class Trainer:
    """A compiled model, its optimizer and fixed inputs: one call is one timed training step."""

    model: torch.nn.Module
    compiled: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor  # (batch, n)
    targets: torch.Tensor  # (batch, n)
    method: str
    record: methods.RewriteRecord | None = None
    dtype: str = "float32"

    def __call__(self) -> tuple[float]:
        clock = StepClock(self.tokens.device)
        clock.mark()
        autocast = (torch.autocast(self.tokens.device.type, dtype=torch.bfloat16) if self.dtype == "bfloat16"
                    else contextlib.nullcontext())
        with autocast:
            _, loss = self.compiled(self.tokens, self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark()
        return clock.seconds_since_first()


def make_trainer(method: str, n: int, args) -> Trainer:
    model = build(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=n,
                  vocab_size=args.vocab_size, seed=0).to(args.device)  # same weights for both methods
    record = None
    if method == "inductor":
        backend = "inductor"
    elif method == "lrcompile":
        record = methods.RewriteRecord()
        backend = record.backend(Policy(degree=args.degree, cost_model=False, on_inaccurate="allow"))
    elif method == "lrcompile_default":
        record = methods.RewriteRecord()
        backend = record.backend(Policy(degree=args.degree))
    else:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    # dynamic=False: one static graph per n, as for the op benchmark.
    compiled = torch.compile(model, backend=backend, dynamic=False)
    generator = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, args.vocab_size, (args.batch, n + 1), generator=generator).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    return Trainer(model, compiled, optimizer, tokens[:, :-1], tokens[:, 1:], method, record, args.dtype)


def rewrite_problem(trainer: Trainer, args) -> str:
    """Why the forced lrcompile row does not measure the rewritten model, or ""."""
    if trainer.method == "lrcompile" and trainer.record.rewritten_sites < args.n_layer:
        return (f"not measured: {trainer.record.rewritten_sites} of {args.n_layer} attention sites rewritten "
                f"and compiled (see lrcompile's warnings)")
    return ""


# ---------------------------------------------------------------------------------------------
# Timing and memory


@dataclass
class Row:
    method: str
    n: int
    skipped: str = ""
    step_s: float | None = None  # median training step
    step_runs: list[float] = field(default_factory=list)
    first_call_s: float | None = None  # compile + one step
    sites_rewritten: int | None = None  # lrcompile methods: attention sites rewritten to low-rank
    peak_bytes: int | None = None
    memory_note: str = ""


def time_configuration(n: int, args, progress) -> list[Row]:
    torch._dynamo.reset()
    rows = {m: Row(m, n) for m in METHODS}
    if n > args.lowrank_max_n:
        for method in METHODS[1:]:
            rows[method].skipped = f"skipped (n > --lowrank-max-n {args.lowrank_max_n})"
    trainers = {m: make_trainer(m, n, args) for m in METHODS if not rows[m].skipped}
    progress.set_postfix_str(f"n={n}")
    measured = interleaved_runs(trainers, args.warmup, args.repeats, on_run=lambda name: progress.update())
    for method, trainer in trainers.items():
        row = rows[method]
        row.skipped = rewrite_problem(trainer, args)
        if not row.skipped:
            row.step_runs = [seconds for (seconds,) in measured[method]["runs"]]
            row.step_s = median(row.step_runs)
            row.first_call_s = measured[method]["first"][0]
            if trainer.record is not None:
                row.sites_rewritten = trainer.record.rewritten_sites
    return list(rows.values())


def memory_child(spec: dict) -> dict:
    """Child process: peak RSS growth of one training step, after a full-size compile and step."""
    args = argparse.Namespace(**spec)
    trainer = make_trainer(args.method, args.n, args)
    peak, note = peak_growth(step=trainer, warm_up=trainer)
    problem = rewrite_problem(trainer, args)
    return {"peak_bytes": None if problem else peak, "note": problem or note}


def measure_memory(rows: list[Row], args, progress_factory) -> None:
    measured = [row for row in rows if not row.skipped]
    with progress_factory(total=len(measured), desc="memory", unit="row") as progress:
        for row in measured:
            progress.set_postfix_str(f"{row.method} n={row.n}")
            spec = dict(method=row.method, n=row.n, device=args.device, dtype=args.dtype, batch=args.batch,
                        n_layer=args.n_layer, n_embd=args.n_embd,
                        n_head=args.n_head, vocab_size=args.vocab_size, degree=args.degree)
            child = run_child([str(Path(__file__).resolve())], ["--memory-child", json.dumps(spec)])
            row.peak_bytes, row.memory_note = child["peak_bytes"], child.get("note", "")
            progress.update()


# ---------------------------------------------------------------------------------------------
# Report


def summarise(rows: list[Row], args) -> dict:
    steps = {(r.method, r.n): r.step_s for r in rows if r.step_s is not None}
    slopes = {}
    for method in METHODS:
        points = [(n, steps[method, n]) for n in args.n if n >= SLOPE_FROM_N and (method, n) in steps]
        slopes[method] = {"slope": loglog_slope(points), "points": len(points)}
    # the forced rewrite only: the default policy's ratio is 1 +- noise where it keeps exact attention
    ratios = [(n, steps["lrcompile", n] / steps["inductor", n]) for n in args.n
              if ("lrcompile", n) in steps and ("inductor", n) in steps]
    crossovers = {"lrcompile": crossover(ratios)}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "memory_child"}
    return {"settings": settings, "machine": machine_info(args.device), "rows": [asdict(r) for r in rows],
            "slopes": slopes, "crossovers": crossovers}


def table_lines(result: dict) -> list[str]:
    rows = result["rows"]
    inductor = {r["n"]: r["step_s"] for r in rows if r["method"] == "inductor"}
    with_memory = result["settings"]["memory"]
    header = ["n", "method", "step ms", "speed-up vs inductor", "sites rewritten", "first call s"] + (
        ["peak MiB"] if with_memory else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["n"], METHODS.index(r["method"]))):
        if r["skipped"]:
            cells = [str(r["n"]), r["method"], r["skipped"]] + [""] * (len(header) - 3)
        else:
            base = inductor.get(r["n"])
            cells = [str(r["n"]), r["method"], f"{r['step_s'] * 1e3:.0f}",
                     "-" if base is None else f"{base / r['step_s']:.2f}",
                     "-" if r["sites_rewritten"] is None else str(r["sites_rewritten"]), f"{r['first_call_s']:.1f}"]
            if with_memory:
                cells.append("-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"GPT, {s['n_layer']} layers, n_embd {s['n_embd']}, {s['n_head']} heads (d = {s['n_embd'] // s['n_head']}), "
        f"vocabulary {s['vocab_size']}, batch {s['batch']}, {s.get('dtype', 'float32')} on {s.get('device', 'cpu')}; "
        f"lrcompile degree {s['degree']}. One step = "
        f"forward + loss + backward + AdamW. Median of {s['repeats']} interleaved steps after {s['warmup']} "
        f"warm-up; speed-up vs inductor = Inductor's step time / the method's, same run; sites rewritten: of the "
        f"{s['n_layer']} attention sites, how many run the low-rank op; first call s = compile + "
        f"one step" + ("; peak MiB = peak RSS growth of one step above model, optimizer state and inputs." if
                       s["memory"] else "."),
        "",
        *table_lines(result),
        "",
        f"- slope of log(step time) vs log(n), least squares over the measured n >= {SLOPE_FROM_N}: " + "; ".join(
            f"{m} {v['slope']:.2f} ({v['points']} n)" if v["slope"] is not None else f"{m} - (fewer than two n)"
            for m, v in result["slopes"].items()),
    ]
    lines.append(f"- crossover, lrcompile faster than inductor from: {result['crossovers']['lrcompile']['text']}")
    default_rows = [r for r in result["rows"] if r["method"] == "lrcompile_default" and not r["skipped"]]
    rewritten = [r["n"] for r in default_rows if r["sites_rewritten"]]
    lines.append("- lrcompile_default (the calibrated cost model decides per site): " + (
        f"exact attention kept up to n = {max([r['n'] for r in default_rows if not r['sites_rewritten']], default='-')}"
        f", rewritten from n = {min(rewritten)}" if rewritten else "exact attention kept at every measured n"))
    lines += [f"- {r['method']} n = {r['n']}: memory {r['memory_note']}" for r in result["rows"] if r["memory_note"]]
    return "\n".join(lines)


def results_markdown(result: dict, args, argv) -> str:
    machine = result["machine"]
    command = " ".join(["python benchmarks/model_speed.py", *argv])
    plot = os.path.relpath(args.plot.resolve(), args.results.resolve().parent)
    gpu = f"{machine['gpu']}, host " if "gpu" in machine else ""
    title = "## Model level: training a 4-layer GPT" + (" on CUDA" if "gpu" in machine else "")
    lines = [title, "",
             f"`{command}` on {gpu}{machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
             f"torch {machine['torch']}, {machine['date']}; lrcompile CPU kernels: {machine['cpu_kernels']}.", "",
             format_report(result), "",
             f"![training step time vs n]({plot})"]
    if result["settings"]["memory"]:
        lines.append(f"![peak memory vs n]({memory_plot_path(plot)})")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    def lines(value):
        return [[("training step, " + result["machine"]["cpu"],
                  {m: [(r["n"], value(r)) for r in result["rows"] if r["method"] == m and not r["skipped"]
                       and value(r) is not None] for m in METHODS})]]
    machine = result["machine"]
    title = f"GPT {result['settings']['n_layer']} layers, torch {machine['torch']}, {machine['date']}"
    plot_lines(lines(lambda r: r["step_s"]), str(path), "training step (s)", title)
    if result["settings"]["memory"]:
        plot_lines(lines(lambda r: None if r["peak_bytes"] is None else r["peak_bytes"] / GIB),
                         memory_plot_path(str(path)), "peak memory of a step (GiB)", title)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    progress_factory = progress_bar()
    print(f"model_speed: {machine_description(args.device)}", flush=True)
    runs = sum(args.warmup + args.repeats for n in args.n for m in METHODS
               if m == "inductor" or n <= args.lowrank_max_n)
    rows = []
    with progress_factory(total=runs, desc="timing", unit="step") as progress:
        for n in args.n:
            rows += time_configuration(n, args, progress)
    if args.memory:
        measure_memory(rows, args, progress_factory)
    result = summarise(rows, args)
    print(format_report(result), flush=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    write_results_section(args.results, SECTION[args.device], results_markdown(result, args, argv))
    print(f"wrote {args.results} (section {SECTION[args.device]}), {args.plot}, {args.json}")


if __name__ == "__main__":
    main()
