"""Train a character-level GPT on Shakespeare with exact and with polynomial attention, side by side.

The question this answers: when the polynomial is the model (Policy(on_inaccurate="allow"),
docs/design.md section 3), does the network learn like softmax attention, and at long contexts does it
reach a given validation loss sooner? The model is lrcompile.models.GPT written as a user writes
it (nanoGPT's explicit matmul + masked_fill + softmax, or --attention sdpa); the runs differ only
in the backend that compiles it:

    exact      torch.compile(model)                                  (Inductor, softmax attention)
    degree g   torch.compile(model, backend=lrcompile.backend(Policy(degree=g,
                             on_inaccurate="allow", cost_model=False)))

Every run starts from the same weights and sees the same batches (batch k at its step k), in
lockstep: step k of every run before step k+1 of any (under --time-budget: the run with the fewest
own seconds steps next), so that the load of other processes on the machine falls on all runs alike.
A run's wall-clock is the sum of its own step times (forward, backward, optimizer step); the first
step, which compiles, is reported apart and left out; evaluations are not counted.

    python examples/train_char_gpt.py                         # small (n = 128, 300 steps): a few minutes
    python examples/train_char_gpt.py --experiment quality --block-size 256 --lr 8e-3 --steps 1000
    python examples/train_char_gpt.py --experiment long-context --block-size 4096 --batch 1 \
        --steps 100000 --time-budget 300 --eval-seconds 15 --eval-batches 4

(README.md, "Training with the rewrite", has the exact commands and results of the full runs.)

Experiment "quality" trains every run for --steps, then evaluates each final model under the other
attention (cross-evaluation: exact's weights under degree-2 attention and the reverse). Experiment
"long-context" trains exact and the first degree for the same --time-budget of their own seconds.
Both write results.json (incrementally) and PNG plots under --results.

The text is examples/data/shakespeare.txt.gz (eight plays from Project Gutenberg; see
examples/data/README.md), split 90/10 into training and validation at a fixed point.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lrcompile
from lrcompile.models import ATTENTION, GPT, GPTConfig

DATA = Path(__file__).resolve().parent / "data" / "shakespeare.txt.gz"
LN2 = math.log(2.0)
# Fewer quality steps than this end every run on the bigram plateau (about 3.6 bits/char), where the
# curves overlap: such a run shows that training works, not how the runs compare.
PLATEAU_STEPS = 1000
FULL_QUALITY_RUN = ("python examples/train_char_gpt.py --experiment quality --block-size 256 --batch 8 --n-layer 4 "
                    "--n-embd 128 --n-head 4 --degrees 2 4 --steps 4000 --lr 3e-3 --warmup 100 --eval-every 250 "
                    "--threads 2")


def smoke_run_note(args) -> str | None:
    if args.experiment != "quality" or args.steps >= PLATEAU_STEPS:
        return None
    return (f"note: {args.steps} steps is a smoke run: every run ends on the bigram plateau (about 3.6 bits/char), so "
            f"the curves overlap and show that training works, not how the runs compare. The runs that show the gap "
            f"and the speed take about half an hour each on 2 cores (README, \"Training with the rewrite\"):\n"
            f"  {FULL_QUALITY_RUN}")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=("quality", "long-context"), default="quality")
    parser.add_argument("--attention", choices=ATTENTION, default="matmul")
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 4],
                        help="polynomial degrees to train beside exact (long-context uses the first)")
    parser.add_argument("--block-size", type=int, default=128, help="context length n (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4, help="head dim d = n_embd / n_head")
    parser.add_argument("--steps", type=int, default=300, help="training steps (quality; long-context: at most)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of its own steps each run may train (long-context)")
    parser.add_argument("--learnable-temperature", action="store_true",
                        help="scale each head's queries by a learned factor (initially --initial-temperature), in every run")
    parser.add_argument("--initial-temperature", type=float, default=1.0,
                        help="with --learnable-temperature: the temperature every head starts from")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50, help="steps of linear learning-rate warm-up")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate every so many steps")
    parser.add_argument("--eval-seconds", type=float, default=None,
                        help="evaluate every so many of a run's own training seconds instead (long-context, "
                             "where the runs' steps differ in cost)")
    parser.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches per evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("results/train_char_gpt"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


# ---- data -----------------------------------------------------------------------------------------

@dataclass
class Corpus:
    train: torch.Tensor  # (N_train,) character ids
    val: torch.Tensor    # (N_val,)
    alphabet: str


def load_corpus(path: Path = DATA) -> Corpus:
    text = gzip.decompress(path.read_bytes()).decode("ascii")
    alphabet = "".join(sorted(set(text)))
    lookup = torch.zeros(128, dtype=torch.long)  # ASCII code -> character id
    lookup[torch.tensor([ord(c) for c in alphabet])] = torch.arange(len(alphabet))
    encoded = lookup[torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()]
    split = int(0.9 * len(encoded))  # a fixed split: the last tenth of the text is never trained on
    return Corpus(encoded[:split], encoded[split:], alphabet)


def random_batch(data: torch.Tensor, batch: int, block_size: int, generator: torch.Generator):
    """(tokens, targets), each (batch, block_size): windows at random offsets, targets shifted by one."""
    starts = torch.randint(0, len(data) - block_size - 1, (batch,), generator=generator)
    windows = torch.stack([data[s:s + block_size + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def validation_batches(corpus: Corpus, args) -> list:
    """The same validation windows for every run and every evaluation (a fixed generator)."""
    generator = torch.Generator().manual_seed(10_000 + args.seed)
    return [random_batch(corpus.val, args.batch, args.block_size, generator) for _ in range(args.eval_batches)]


# ---- runs -----------------------------------------------------------------------------------------

def policy_for(degree: int) -> lrcompile.Policy:
    # on_inaccurate="allow": the polynomial is the model at every step (no per-call fallback to
    # softmax). cost_model=False: every site is rewritten whatever this machine's calibration says.
    return lrcompile.Policy(degree=degree, on_inaccurate="allow", cost_model=False)


def compile_for(model: GPT, degree: int | None):
    """The model compiled as a user would: Inductor for exact attention, lrcompile for degree g."""
    if degree is None:
        return torch.compile(model)
    return torch.compile(model, backend=lrcompile.backend(policy_for(degree)))


def run_name(degree: int | None) -> str:
    return "exact" if degree is None else f"degree {degree}"


def feature_dim(head_dim: int, degree: int) -> int:
    return math.comb(head_dim + degree, degree)


@dataclass
class Run:
    name: str
    degree: int | None
    model: GPT                      # the uncompiled module: its state_dict has no _orig_mod. prefix
    compiled: object
    optimizer: torch.optim.Optimizer
    compile_seconds: float = 0.0    # the first step, which compiles forward and backward
    train_seconds: float = 0.0      # the sum of the other steps' own times
    steps: int = 0
    train_losses: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # [{"step", "seconds", "val_bits_per_char"}]

    def summary(self) -> dict:
        timed = max(self.steps - 1, 1)
        return {"degree": self.degree, "steps": self.steps, "compile_seconds": round(self.compile_seconds, 2),
                "train_seconds": round(self.train_seconds, 2),
                "seconds_per_step": round(self.train_seconds / timed, 4),
                "final_val_bits_per_char": self.curve[-1]["val_bits_per_char"] if self.curve else None,
                "curve": self.curve, "train_losses": [round(x, 4) for x in self.train_losses]}


class QueryTemperature(nn.Module):
    """The fused q, k, v projection, with each head's queries scaled by a learned exp(log_temperature).

    Scores become temperature * q.k / sqrt(d): a network can sharpen (or flatten) a head's attention
    with one parameter instead of growing the norms of q and k, which the polynomial kernel needs far
    more of than exp to single out one key among n (the learnable temperature of the linear- and
    polynomial-attention literature). The site is still the user's matmul + softmax on new queries.
    """

    def __init__(self, projection: nn.Linear, n_head: int, initial: float = 1.0):
        super().__init__()
        self.projection, self.n_head = projection, n_head
        self.log_temperature = nn.Parameter(torch.full((n_head,), math.log(initial)))

    def forward(self, x):
        q, k, v = self.projection(x).split(self.projection.out_features // 3, dim=-1)
        head_dim = q.shape[-1] // self.n_head
        temperature = self.log_temperature.exp().repeat_interleave(head_dim)  # (channels,)
        return torch.cat([q * temperature, k, v], dim=-1)


@dataclass(frozen=True)
class ModelSpec:
    config: GPTConfig
    learnable_temperature: bool = False
    initial_temperature: float = 1.0

    def build(self) -> GPT:
        model = GPT(self.config)
        if self.learnable_temperature:
            for block in model.h:
                block.attn.c_attn = QueryTemperature(block.attn.c_attn, self.config.n_head, self.initial_temperature)
        return model


def build_config(args, corpus: Corpus) -> GPTConfig:
    return GPTConfig(block_size=args.block_size, vocab_size=len(corpus.alphabet), n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd, attention=args.attention)


def build_runs(args, spec: ModelSpec, degrees) -> list[Run]:
    torch.manual_seed(args.seed)
    initial = spec.build().state_dict()
    runs = []
    for degree in degrees:
        model = spec.build()
        model.load_state_dict(initial)  # every run starts from the same weights
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
        runs.append(Run(run_name(degree), degree, model, compile_for(model, degree), optimizer))
    return runs


def learning_rate(args, step: int, total_steps: int | None) -> float:
    """Linear warm-up, then cosine decay to a tenth over total_steps (constant when it is unknown)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if total_steps is None:
        return args.lr
    progress = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_step(run: Run, tokens, targets, lr: float) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    start = time.perf_counter()
    _, loss = run.compiled(tokens, targets)
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    seconds = time.perf_counter() - start
    if run.steps == 0:
        run.compile_seconds = seconds
    else:
        run.train_seconds += seconds
    run.steps += 1
    run.train_losses.append(value)


@torch.no_grad()
def validation_bits_per_char(compiled, batches) -> float:
    losses = [compiled(tokens, targets)[1].item() for tokens, targets in batches]
    return sum(losses) / len(losses) / LN2


def evaluate(run: Run, batches) -> float:
    bits = validation_bits_per_char(run.compiled, batches)
    run.curve.append({"step": run.steps, "seconds": round(run.train_seconds, 2), "val_bits_per_char": round(bits, 4)})
    return bits


def cross_evaluate(runs: list[Run], spec: ModelSpec, batches) -> dict:
    """Each run's final weights evaluated under every other run's attention (a fresh model, load_state_dict)."""
    table = {}
    for trained in runs:
        for attention in runs:
            if attention is trained:
                continue
            model = spec.build()
            model.load_state_dict(trained.model.state_dict())
            bits = validation_bits_per_char(compile_for(model, attention.degree), batches)
            table[f"{trained.name} weights, {attention.name} attention"] = round(bits, 4)
    return table


def rewritten_sites(spec: ModelSpec, degree: int, example) -> dict:
    """What lrcompile.explain says of the model under degree g: every site should be rewritten."""
    report = lrcompile.explain(spec.build(), *example, policy=policy_for(degree))
    return {"sites": len(report.sites), "rewritten": sum(site.rewritten for site in report.sites),
            "feature_dim": [site.feature_dim for site in report.sites],
            "reasons_kept": [site.reason for site in report.sites if not site.rewritten]}


# ---- the experiments ------------------------------------------------------------------------------

def progress_bar(args, total, description):
    if args.quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=description, unit="step", dynamic_ncols=True)


class TrainingBatches:
    """Batch k of the training stream, the same for every run whenever it asks (drawn in order, kept
    until every run is past it)."""

    def __init__(self, corpus: Corpus, args):
        self.corpus, self.args = corpus, args
        self.generator = torch.Generator().manual_seed(args.seed)
        self.drawn: dict[int, tuple] = {}
        self.count = 0

    def batch(self, step: int):
        while self.count <= step:
            self.drawn[self.count] = random_batch(self.corpus.train, self.args.batch, self.args.block_size,
                                                  self.generator)
            self.count += 1
        return self.drawn[step]

    def forget_before(self, step: int) -> None:
        for old in [k for k in self.drawn if k < step]:
            del self.drawn[old]


def train_in_lockstep(args, runs: list[Run], corpus: Corpus, batches, write) -> None:
    """Always step the run that is furthest behind, so that the machine's load falls on all alike.

    Behind means fewer steps (quality: step k of every run before step k+1 of any) or, under
    --time-budget, fewer of its own training seconds: a run whose steps are cheap takes several
    steps while the other takes one, and both spend their budgets over the same stretch of time.
    A run stops at --steps or when its own seconds pass --time-budget.
    """
    stream = TrainingBatches(corpus, args)
    schedule_steps = None if args.time_budget else args.steps
    bar = progress_bar(args, None if args.time_budget else args.steps * len(runs), args.experiment)

    def active(run):
        return run.steps < args.steps and (args.time_budget is None or run.train_seconds < args.time_budget)

    def behind(run):
        return run.train_seconds if args.time_budget else run.steps

    def due_for_evaluation(run):
        if args.eval_seconds:  # the curve's first point is at 0 s
            return run.train_seconds >= args.eval_seconds * len(run.curve)
        return run.steps % args.eval_every == 0

    for run in runs:
        evaluate(run, batches)
    while any(active(run) for run in runs):
        run = min((run for run in runs if active(run)), key=behind)
        tokens, targets = stream.batch(run.steps)
        train_step(run, tokens, targets, learning_rate(args, run.steps, schedule_steps))
        stream.forget_before(min(run.steps for run in runs))
        if due_for_evaluation(run) or not active(run):
            evaluate(run, batches)
            write()
        if bar is not None:
            bar.update(1)
            bar.set_postfix({run.name: f"{run.curve[-1]['val_bits_per_char']:.3f}" for run in runs})
    if bar is not None:
        bar.close()


def environment(args) -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": _cpu_name(), "python": platform.python_version()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    # Every GPT instance shares GPT.forward's code object, so Dynamo keeps one cache entry per
    # (backend, grad mode) of each run there; with three runs and the cross-evaluation that is
    # more than the default limit of 8, past which Dynamo would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    corpus = load_corpus()
    config = build_config(args, corpus)
    spec = ModelSpec(config, args.learnable_temperature, args.initial_temperature)
    degrees = [None] + (args.degrees if args.experiment == "quality" else args.degrees[:1])
    head_dim = args.n_embd // args.n_head
    batches = validation_batches(corpus, args)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.experiment}.json"

    result = {"experiment": args.experiment, "command": _command(argv),
              "config": {**vars(args), "results": str(args.results), "head_dim": head_dim,
                         "vocab_size": config.vocab_size, "train_chars": len(corpus.train),
                         "val_chars": len(corpus.val)},
              "feature_dim": {f"degree {g}": feature_dim(head_dim, g) for g in degrees if g is not None},
              "environment": environment(args),
              "sites": {f"degree {g}": rewritten_sites(spec, g, batches[0]) for g in degrees if g is not None}}
    torch._dynamo.reset()  # explain's compiles are not the runs'
    lrcompile.reset_stats()
    runs = build_runs(args, spec, degrees)
    print(f"{args.experiment}: GPT {args.n_layer} layers, {args.n_head} heads of d = {head_dim}, "
          f"n = {args.block_size}, batch {args.batch}, {torch.get_num_threads()} thread(s); runs: "
          + ", ".join(run.name + (f" (r = {feature_dim(head_dim, run.degree)})" if run.degree else "") for run in runs))
    for name, sites in result["sites"].items():
        print(f"  {name}: {sites['rewritten']} of {sites['sites']} attention sites rewritten")
    note = smoke_run_note(args)
    if note:
        print(note, flush=True)

    def write():
        result["runs"] = {run.name: run.summary() for run in runs}
        path.write_text(json.dumps(result, indent=1))

    train_in_lockstep(args, runs, corpus, batches, write)
    result["site_calls"] = {label: stats.calls for label, stats in lrcompile.stats().items()}
    if args.experiment == "quality":
        result["cross_evaluation"] = cross_evaluate(runs, spec, batches)
    write()  # fills result["runs"] with the final summaries
    result["gaps"] = relative_gaps(runs)
    result["time_to_exact_final"] = time_to_exact_final(result)
    write()
    print_summary(result)
    if note:
        print(note)
    if not args.no_plot:
        result["plots"] = plot(result, args.results)
        write()
    return result


def relative_gaps(runs: list[Run]) -> dict:
    """(run's final val bits/char - exact's) / exact's, per run."""
    exact = runs[0].curve[-1]["val_bits_per_char"]
    return {run.name: round((run.curve[-1]["val_bits_per_char"] - exact) / exact, 4) for run in runs[1:]}


def seconds_to_reach(curve: list, bits: float) -> float | None:
    """A run's own training seconds at its first evaluation at or below `bits` (None: never)."""
    return next((point["seconds"] for point in curve if point["val_bits_per_char"] <= bits), None)


def time_to_exact_final(result: dict) -> dict:
    """Each run's own seconds to reach the validation loss exact ended at: is the rewrite there sooner?"""
    target = result["runs"]["exact"]["final_val_bits_per_char"]
    return {"val_bits_per_char": target,
            "seconds": {name: seconds_to_reach(run["curve"], target) for name, run in result["runs"].items()}}


def print_summary(result: dict) -> None:
    print(f"{'run':>10}  {'steps':>6}  {'s/step':>7}  {'compile s':>9}  {'val bits/char':>13}  {'gap to exact':>12}")
    for name, run in result["runs"].items():
        gap = result["gaps"].get(name)
        print(f"{name:>10}  {run['steps']:>6}  {run['seconds_per_step']:>7.3f}  {run['compile_seconds']:>9.1f}  "
              f"{run['final_val_bits_per_char']:>13.3f}  {'' if gap is None else f'{100 * gap:+.1f}%':>12}")
    reach = result["time_to_exact_final"]
    print(f"  own seconds to reach exact's final {reach['val_bits_per_char']:.3f} bits/char: "
          + ", ".join(f"{name} {'never' if t is None else f'{t:.0f} s'}" for name, t in reach["seconds"].items()))
    for name, bits in result.get("cross_evaluation", {}).items():
        print(f"  cross-evaluation: {name}: {bits:.3f} bits/char")


def plot(result: dict, directory: Path) -> list[str]:
    """Validation bits/char against steps and against each run's own training seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["config"]
    title = (f"{result['experiment']}: n = {config['block_size']}, {config['n_layer']} layers, "
             f"d = {config['head_dim']}, batch {config['batch']}, {result['environment']['threads']} thread(s)")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, run in result["runs"].items():
        curve = run["curve"]
        axes[0].plot([p["step"] for p in curve], [p["val_bits_per_char"] for p in curve], marker=".", label=name)
        axes[1].plot([p["seconds"] for p in curve], [p["val_bits_per_char"] for p in curve], marker=".", label=name)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("own training seconds (compile excluded)")
    axes[0].set_ylabel("validation bits/char")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    name = directory / f"{result['experiment']}.png"
    figure.savefig(name, dpi=110)
    plt.close(figure)
    return [str(name)]


def _command(argv) -> str:
    import sys
    words = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python examples/train_char_gpt.py", *words])


if __name__ == "__main__":
    main()
