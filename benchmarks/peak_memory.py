"""Peak memory of forward + backward at long sequence length, one configuration per process.

Each configuration runs in a fresh subprocess; the figure is the growth of the process's peak
resident set (ru_maxrss) from just after the inputs exist to the end of forward + backward. A
small warm-up call first loads libraries and builds the polynomial and feature tables, and glibc
is told to map every buffer over 128 KiB separately, so freed chunk buffers go back to the
system instead of staying in the heap: the figure is then the run's own peak, rounded up to pages.

    python benchmarks/peak_memory.py                  # n = 32768, one head, d = 64, degree 2
    python benchmarks/peak_memory.py --n 8192 --sdpa  # also measure SDPA
"""

import argparse
import json
import os
import resource
import subprocess
import sys

GIB = 2**30


def run_one(method, n, head_dim, degree, causal):
    import torch
    import torch.nn.functional as F

    from lrcompile import lowrank_attention

    torch.manual_seed(0)
    attend = lowrank_attention if method == "lowrank" else F.scaled_dot_product_attention
    kwargs = dict(degree=degree) if method == "lowrank" else {}
    warm = [torch.randn(1, 1, 256, head_dim, requires_grad=True) for _ in range(3)]
    attend(*warm, is_causal=causal, **kwargs).sum().backward()
    q, k, v = (torch.randn(1, 1, n, head_dim).mul_(0.3).requires_grad_() for _ in range(3))
    input_bytes = 3 * q.numel() * q.element_size()
    rss_before = _current_rss()
    out = attend(q, k, v, is_causal=causal, **kwargs)
    out.backward(torch.ones_like(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "n": n, "causal": causal, "input_bytes": input_bytes, "peak_above_inputs": peak - rss_before}


def _current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--sdpa", action="store_true", help="also measure F.scaled_dot_product_attention")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, causal = args.child.split(",")
        print(json.dumps(run_one(method, args.n, args.head_dim, args.degree, causal == "causal")))
        return
    print(f"n = {args.n}, one head, d = {args.head_dim}, degree {args.degree}, float32, forward + backward")
    print(f"exact attention materialised: n^2 x 4 bytes = {args.n**2 * 4 / GIB:.2f} GiB for the weights alone")
    methods = ["lowrank"] + (["sdpa"] if args.sdpa else [])
    from tqdm import tqdm  # a child process per row, each tens of seconds at long n

    rows = [(method, causal) for method in methods for causal in ("noncausal", "causal")]
    for method, causal in tqdm(rows, desc="memory", unit="row", leave=False, file=sys.stderr):
        command = [sys.executable, __file__, "--child", f"{method},{causal}", "--n", str(args.n),
                   "--head-dim", str(args.head_dim), "--degree", str(args.degree)]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)
        print(f"{method:8s} {causal:10s} peak above inputs: {result['peak_above_inputs'] / GIB:.3f} GiB "
              f"(inputs {result['input_bytes'] / GIB:.3f} GiB)")

if __name__ == "__main__":
    main()
