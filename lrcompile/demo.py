"""The main job: what lrcompile does, measured on this machine.

    python3 dev.py demo            (or: python -m lrcompile.demo [--n 8192])

1. The op: lowrank_attention on a long sequence, its error against exact attention and its time
   against F.scaled_dot_product_attention, forward + backward, measured side by side.
2. A model: a 4-layer GPT compiled with backend="lrcompile" (default policy): the site report,
   the error of its logits against the exact model, and its training-step time against the same
   model compiled by Inductor with exact attention.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from lrcompile import lowrank_attention, native
from lrcompile.polynomial import exp_polynomial
from lrcompile.reference import random_attention_inputs


def median_time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def op_demo(n, heads, head_dim, score_range):
    print(f"== lowrank_attention: n = {n}, heads = {heads}, d = {head_dim}, degree 2, float32, "
          f"scores within [-{score_range:g}, {score_range:g}]")
    q, k, v = random_attention_inputs(1, heads, n, n, head_dim, score_range=score_range, attained=True,
                                      dtype=torch.float32, seed=0)
    for causal in (False, True):
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        approx = lowrank_attention(q, k, v, is_causal=causal)
        error = (approx.double() - exact).abs().max().item()
        bound = exp_polynomial(2, score_range).output_error_factor * v.abs().max().item()

        def exact_step():
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

        def lowrank_step():
            lowrank_attention(q, k, v, is_causal=causal).sum().backward()

        exact_time, lowrank_time = median_time(exact_step), median_time(lowrank_step)
        print(f"  {'causal    ' if causal else 'non-causal'}  max |error| {error:.2e} (bound {bound:.2e})   "
              f"forward+backward: SDPA {exact_time * 1e3:7.1f} ms, lowrank {lowrank_time * 1e3:7.1f} ms, "
              f"speed-up x{exact_time / lowrank_time:.2f}")


def model_demo(n):
    from lrcompile.compiler import backend
    from lrcompile.guard import reset_stats, stats
    from lrcompile.policy import Policy
    from lrcompile.models import nanogpt
    from lrcompile.report import explain

    print(f"\n== torch.compile(model, backend='lrcompile'): 4-layer GPT (d_head = 16), sequence length {n}")
    model, (idx,) = nanogpt(n=n)
    model.train()
    print(explain(model, idx))
    torch._dynamo.reset()
    reset_stats()
    ours = torch.compile(model, backend=backend())
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
              f"{max(s.largest_error for s in calls.values()):.2e} (max_error {Policy().max_error:g})")
    else:
        print("  accuracy guard: no rewritten site ran (the policy kept exact attention at this length)")

    def step(compiled):
        def run():
            model.zero_grad(set_to_none=True)
            compiled(idx).float().logsumexp(-1).mean().backward()
        return run

    ours_time, exact_time = median_time(step(ours)), median_time(step(exact))
    print(f"  training step (forward + backward): Inductor exact {exact_time * 1e3:.0f} ms, "
          f"lrcompile {ours_time * 1e3:.0f} ms, speed-up x{exact_time / ours_time:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--score-range", type=float, default=1.0)
    parser.add_argument("--model-n", type=int, default=4096, help="sequence length of the model demo")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"lrcompile CPU kernels: {native.status()}; {torch.get_num_threads()} torch threads\n")
    op_demo(args.n, args.heads, args.head_dim, args.score_range)
    model_demo(args.model_n)


if __name__ == "__main__":
    main()
