"""The Triton kernels on a lent GPU, in one short run (about 3-5 minutes on an H100/H200).

    python benchmarks/gpu_check.py                 # all three steps
    python benchmarks/gpu_check.py --skip-tests    # kernel names and timings only
    python benchmarks/gpu_check.py --n 4096        # fewer timing rows

1. The CUDA tests of tests/test_triton_kernels.py (`-m gpu`): the registered ops against the
   float64 reference (float32 and bfloat16, degree 2 at d = 64 and degree 3 at d = 32, causal and
   not, GQA, key padding), opcheck and torch.compile of the op, and a compiled model whose
   Inductor output code holds our kernels beside Inductor's own Triton, forward and backward.
2. The Triton kernels Inductor's output code defines for one training step of a 2-layer GPT
   (d = 64, n = 512, causal) compiled by lrcompile with every eligible site rewritten, per graph:
   ours (_block_forward_kernel, _sweep_backward_kernel, ...) and Inductor's (triton_poi_..., ...).
3. Forward + backward time of `lrcompile::triton_factored_attention` against SDPA's flash
   backend, bfloat16, batch 1, 8 heads, n = 4096 and 16384, causal and not, degree 2 at d = 64
   and degree 3 at d = 32, measured by triton.testing.do_bench (median ms; CUDA events).

Prints everything; writes nothing. Exits non-zero if the tests fail or there is no CUDA.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))

TAYLOR = {2: [1.0, 1.0, 0.5], 3: [1.0, 1.0, 0.5, 1 / 6]}
TIMED = [(64, 2), (32, 3)]  # (head_dim, degree)


def run_tests() -> bool:
    command = [sys.executable, "-m", "pytest", "tests/test_triton_kernels.py", "-q", "-p", "no:cacheprovider",
               "-m", "gpu", "-rs"]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.run(command, cwd=ROOT, timeout=300).returncode == 0


def print_kernel_names() -> None:
    from test_triton_kernels import _model, compiled_step_code, kernel_names

    model, inputs = _model(causal=True)
    for graph, names in enumerate(kernel_names(compiled_step_code(model, inputs))):
        ours = [name for name in names if "_kernel" in name]
        inductors = [name for name in names if name.startswith("triton_")]
        print(f"graph {graph}: ours {ours}\n         Inductor's ({len(inductors)}) {inductors}")


def time_fwd_bwd(attend, leaves, grad_out) -> float:
    from triton.testing import do_bench

    def step():
        torch.autograd.grad(attend(*leaves), leaves, grad_out)

    return do_bench(step, warmup=5, rep=50)


def print_timings(lengths) -> None:
    import lrcompile.triton_kernels  # noqa: F401  registers lrcompile::triton_factored_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dtype = 8, torch.bfloat16
    print(f"{'d':>3} {'deg':>3} {'causal':>6} {'n':>6}  {'triton ms':>10} {'flash ms':>9} {'ratio':>6}")
    for head_dim, degree in TIMED:
        for causal in (False, True):
            for n in lengths:
                q, k, v = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=dtype) * 0.3 for _ in range(3))
                grad_out = torch.randn_like(q)
                args = (TAYLOR[degree], head_dim**-0.5, causal, 64)

                def ours(q, k, v):
                    return torch.ops.lrcompile.triton_factored_attention(q.unsqueeze(2), k, v, None, *args)[0].squeeze(2)

                def flash(q, k, v):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                leaves = [t.requires_grad_() for t in (q, k, v)]
                triton_ms, flash_ms = (time_fwd_bwd(attend, leaves, grad_out) for attend in (ours, flash))
                print(f"{head_dim:>3} {degree:>3} {str(causal):>6} {n:>6}  {triton_ms:>10.2f} {flash_ms:>9.2f} "
                      f"{triton_ms / flash_ms:>6.2f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384], help="sequence lengths timed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    passed = args.skip_tests or run_tests()
    print("\n== Inductor output code: Triton kernels per graph, rewritten GPT (n = 512, causal) ==", flush=True)
    print_kernel_names()
    print("\n== forward + backward, bfloat16, B = 1, H = 8: Triton op vs SDPA flash ==", flush=True)
    print_timings(args.n)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
