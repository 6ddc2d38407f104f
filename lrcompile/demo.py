"""The main job: what lrcompile does, measured on this machine.

    python3 dev.py demo            (or: python -m lrcompile.demo [--n 8192])

0. The cost model's calibration: a calibration applies only to the machine and kernel path it was
   measured on, so on a machine without one the demo first runs `lrcompile calibrate` (under a
   minute, stored in the user's cache for every later run) rather than show a default policy that
   keeps every site exact.
1. The op: lowrank_attention on a long sequence, its error against exact attention and its time
   against F.scaled_dot_product_attention, forward + backward, timed interleaved (lrcompile.bench.timing).
2. A model: a 4-layer GPT compiled with backend="lrcompile" (default policy): the site report,
   the error of its logits against the exact model, and its training-step time against the same
   model compiled by Inductor with exact attention, interleaved. The sequence length is raised
   to where this machine's calibration rewrites the sites, if the one asked for is below it.
"""

import argparse
import functools
import math

import torch
import torch.nn.functional as F

from lrcompile import lowrank_attention
from lrcompile.bench.timing import StepClock, interleaved_runs, median, progress_bar, training_step_times
from lrcompile.compile import calibration, cost_model
from lrcompile.kernels import cpu
from lrcompile.math.polynomial import exp_polynomial
from lrcompile.ops.attention import default_chunk_size
from lrcompile.ops.guard import reset_stats, stats
from lrcompile.reference import random_attention_inputs

MODEL_HEADS, MODEL_HEAD_DIM = 4, 16  # lrcompile.models.nanogpt
LONGEST_MODEL_N = 8192  # beyond it, Inductor's exact model materialises several GiB of weights per layer


def ensure_calibrated(batch_heads: int) -> calibration.Lookup:
    """This machine's calibration for the path a call of `batch_heads` runs; measured first if missing."""
    implementation = calibration.implementation_for("cpu", batch_heads)
    found = calibration.lookup("cpu", implementation)
    if found.calibration is None:
        from lrcompile.bench.calibrate import calibrate, summary

        print(f"== {found.description}.\n   Calibrating first: `lrcompile calibrate` (under a minute; kept for "
              f"later runs)", flush=True)
        entry, path = calibrate("cpu", heads=batch_heads)
        print(summary(entry, path))
        found = calibration.lookup("cpu", implementation)
    print(f"cost model: {found.description}\n", flush=True)
    return found


def interleaved_medians(steps: dict, what: str, repeats: int = 3) -> dict:
    """{name: median seconds of the whole step}, steps timed round-robin after one warm-up each;
    the progress bar says `what` is timed."""
    description = f"timing {what}: {' vs '.join(steps)}"
    with progress_bar()(total=len(steps) * (1 + repeats), desc=description, unit="run") as progress:
        runs = interleaved_runs(steps, warmup=1, repeats=repeats, on_run=lambda _: progress.update())
    return {name: median([times[-1] for times in measured["runs"]]) for name, measured in runs.items()}


def op_demo(n, heads, head_dim, score_range):
    print(f"== lowrank_attention: n = {n}, heads = {heads}, d = {head_dim}, degree 2, float32, "
          f"scores within [-{score_range:g}, {score_range:g}]")
    q, k, v = random_attention_inputs(1, heads, n, n, head_dim, score_range=score_range, attained=True,
                                      dtype=torch.float32, seed=0)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    bound = exp_polynomial(2, score_range).output_error_factor
    for causal in (False, True):
        mask = "causal" if causal else "non-causal"
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        reset_stats()
        label = f"demo {mask}"
        approx = lowrank_attention(q, k, v, is_causal=causal, on_inaccurate="exact", site_label=label)
        guard = stats()[label]
        error = (approx.double() - exact).abs().max().item() / v.abs().max().item()
        steps = {
            "sdpa": functools.partial(training_step_times,
                                      functools.partial(F.scaled_dot_product_attention, is_causal=causal),
                                      q, k, v, grad_out),
            "lowrank": functools.partial(training_step_times,
                                         functools.partial(lowrank_attention, is_causal=causal), q, k, v, grad_out),
        }
        seconds = interleaved_medians(steps, f"the op, {mask}")
        verdict = "sent to exact attention" if guard.fallbacks else "passed"
        print(f"  {mask:10}  measured max |error| / max |v| {error:.2e}; accuracy guard: estimated "
              f"{guard.largest_error:.2e}, {verdict} (max_error 0.01)\n"
              f"              forward+backward: SDPA {seconds['sdpa'] * 1e3:7.1f} ms, lowrank "
              f"{seconds['lowrank'] * 1e3:7.1f} ms, speed-up x{seconds['sdpa'] / seconds['lowrank']:.2f}")
    print(f"  {bound_sentence(bound, score_range)}")


def bound_sentence(bound: float, score_range: float) -> str:
    """The worst-case bound on |error| / max |v|, or why it says nothing here."""
    if bound < 1:
        return f"worst-case bound for scores in [-{score_range:g}, {score_range:g}]: {bound:.2e} of max |v|"
    return (f"(the worst-case bound for scores in [-{score_range:g}, {score_range:g}] is {bound:.2g} of max |v|: "
            f"vacuous, since no output can be off by more than max |v| anyway; it assumes every score sits where "
            f"the polynomial is worst, which random inputs do not. The measured error and the guard are what count.)")


def model_length(requested: int, found: calibration.Lookup) -> int | None:
    """The model demo's sequence length: `requested`, or the power of two from which this machine's
    calibration rewrites the model's causal sites if that is longer; None if that is beyond reach."""
    chunk = default_chunk_size(MODEL_HEAD_DIM, 2, True)
    crossover = cost_model.crossover_length(MODEL_HEAD_DIM, MODEL_HEAD_DIM, True, 2, chunk,
                                            ratio=found.calibration.rate_ratio(True, MODEL_HEADS),
                                            shortest_crossover=found.calibration.shortest_crossover_for(True))
    if crossover is None or crossover > LONGEST_MODEL_N:
        return None
    return max(requested, 2 ** math.ceil(math.log2(crossover)))


def model_demo(n, found):
    from lrcompile.compile.backend import backend
    from lrcompile.models import nanogpt
    from lrcompile.compile.policy import Policy
    from lrcompile.compile.report import explain

    policy, length = Policy(), model_length(n, found)
    if length is None:
        print(f"\n(this machine's calibration predicts exact attention faster up to n = {LONGEST_MODEL_N} for this "
              f"model, so the demo forces the rewrite: Policy(cost_model=False))")
        policy, length = Policy(cost_model=False), n
    elif length != n:
        print(f"\n(on this machine the cost model rewrites this model's sites from n = {length}, not {n}: "
              f"the model demo runs there)")
    print(f"\n== torch.compile(model, backend='lrcompile'): 4-layer GPT (d_head = {MODEL_HEAD_DIM}), "
          f"sequence length {length}")
    model, (idx,) = nanogpt(n=length)
    model.train()
    print(explain(model, idx, policy=policy))
    torch._dynamo.reset()
    reset_stats()
    ours = torch.compile(model, backend=backend(policy))
    exact = torch.compile(model, backend="inductor")
    with torch.no_grad():
        reference = model.double()(idx)
        model.float()
        logits = ours(idx)
        error = (logits.double() - reference).abs().max().item() / reference.abs().max().item()
    print(f"  logits: max |lrcompile - exact| / max |exact| = {error:.2e}")
    calls = stats()
    if calls:
        print(f"  accuracy guard: {sum(s.calls for s in calls.values())} calls of {len(calls)} rewritten sites, "
              f"{sum(s.fallbacks for s in calls.values())} sent to exact attention, largest estimated error "
              f"{max(s.largest_error for s in calls.values()):.2e} (max_error {policy.max_error:g})")
    else:
        print("  accuracy guard: no rewritten site ran (the policy kept exact attention at this length)")

    def step(compiled):
        def run():
            model.zero_grad(set_to_none=True)
            clock = StepClock("cpu")
            clock.mark()
            compiled(idx).float().logsumexp(-1).mean().backward()
            clock.mark()
            return clock.seconds_since_first()
        return run

    seconds = interleaved_medians({"inductor": step(exact), "lrcompile": step(ours)}, "the model's training step")
    print(f"  training step (forward + backward, interleaved): Inductor exact {seconds['inductor'] * 1e3:.0f} ms, "
          f"lrcompile {seconds['lrcompile'] * 1e3:.0f} ms, speed-up x{seconds['inductor'] / seconds['lrcompile']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--score-range", type=float, default=1.0)
    parser.add_argument("--model-n", type=int, default=4096, help="sequence length of the model demo (at least)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"lrcompile CPU kernels: {cpu.status()}; {torch.get_num_threads()} torch threads\n")
    found = ensure_calibrated(MODEL_HEADS)
    op_demo(args.n, args.heads, args.head_dim, args.score_range)
    model_demo(args.model_n, found)


if __name__ == "__main__":
    main()
