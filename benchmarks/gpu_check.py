"""The Triton kernels on a lent GPU, in one short run (about 3-5 minutes on an H100/H200).

    python benchmarks/gpu_check.py                 # all three steps
    python benchmarks/gpu_check.py --skip-tests    # kernel names and timings only
    python benchmarks/gpu_check.py --n 4096        # fewer timing rows
    python benchmarks/gpu_check.py --skip-tests --blocks 32 64   # our kernels at both row tiles

1. The CUDA tests of tests/test_triton_kernels.py (`-m gpu`): the registered ops against the
   float64 reference (float32 and bfloat16, degree 2 at d = 64 and degree 3 at d = 32, causal and
   not, GQA, key padding), opcheck and torch.compile of the op, and a compiled model whose
   Inductor output code holds our kernels beside Inductor's own Triton, forward and backward.
2. The Triton kernels Inductor's output code defines for one training step of a 2-layer GPT
   (d = 64, n = 512, causal) compiled by lrcompile with every eligible site rewritten, per graph:
   ours (_block_forward_kernel, _sweep_backward_kernel, ...) and Inductor's (triton_poi_..., ...).
3. Forward + backward time of our kernels (the launchers `lrcompile::triton_factored_attention`
   calls) against SDPA's flash backend, bfloat16, batch 1, 8 heads, n = 4096 and 16384, causal
   and not, degree 2 at d = 64 and degree 3 at d = 32, measured by triton.testing.do_bench
   (median ms; CUDA events); ratio = ours / flash. The row tile is a guess until timed here:
   compiled for sm_90 with 4 warps, the sweeps spill at 64-row tiles (ptxas -v: the causal
   backward sweep 4.8 KB a thread at d = 64 with float32 inputs, 1.4 KB at 32 rows), so
   `--blocks 32 64` shows which wins.

Prints everything; writes nothing. Exits non-zero if the tests fail or there is no CUDA.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
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


def print_timings(lengths, blocks) -> None:
    """Forward + backward of our kernels (the launchers the op calls, at each tile size in `blocks`;
    None: the default) and of SDPA's flash kernel, one row per configuration."""
    from lrcompile.kernels import triton as triton_kernels
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    heads, dtype = 8, torch.bfloat16
    labels = [f"tile {block or 'default'} ms" for block in blocks]
    print(f"{'d':>3} {'deg':>3} {'causal':>6} {'n':>6}  " + " ".join(f"{label:>17}" for label in labels)
          + f" {'flash ms':>9} {'ratio':>6}")
    for head_dim, degree in TIMED:
        for causal in (False, True):
            for n in lengths:
                q, k, v = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=dtype) * 0.3 for _ in range(3))
                grad_out = torch.randn_like(q)
                args = (TAYLOR[degree], head_dim**-0.5, causal, 64)  # coefficients, scale, causal, chunk_size

                def ours(block):
                    out, denominator, state = triton_kernels.forward(q.unsqueeze(2), k, v, None, *args, block_size=block)
                    triton_kernels.backward(grad_out.unsqueeze(2), q.unsqueeze(2), k, v, None, out, denominator, state,
                                            *args, False, block_size=block)

                leaves = [t.clone().requires_grad_() for t in (q, k, v)]

                def flash():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
                    torch.autograd.grad(out, leaves, grad_out)

                ours_ms = [do_bench(lambda: ours(block), warmup=5, rep=50) for block in blocks]
                flash_ms = do_bench(flash, warmup=5, rep=50)
                print(f"{head_dim:>3} {degree:>3} {str(causal):>6} {n:>6}  " + " ".join(f"{ms:>17.2f}" for ms in ours_ms)
                      + f" {flash_ms:>9.2f} {min(ours_ms) / flash_ms:>6.2f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384], help="sequence lengths timed")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0],
                        help="row tiles of our kernels to time (0: the default, _block_size); e.g. --blocks 32 64")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    passed = args.skip_tests or run_tests()
    print("\n== Inductor output code: Triton kernels per graph, rewritten GPT (n = 512, causal) ==", flush=True)
    try:  # a failure here should not cost the timings below: one run is all a lent GPU may give
        print_kernel_names()
    except Exception:
        traceback.print_exc()
        passed = False
    print("\n== forward + backward, bfloat16, B = 1, H = 8: Triton op vs SDPA flash ==", flush=True)
    print_timings(args.n, [block or None for block in args.blocks])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
