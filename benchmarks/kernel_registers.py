"""Registers, spills and tensor-core products of every Triton kernel one call launches, compiled for
sm_90 (H100/H200) without a GPU: what `ptxas -v` says of the code Inductor would run.

Each configuration records the launches of one forward and one backward (a GQA call with key
padding, bfloat16, at a CUDA call's row tile and warps: lrcompile.bench.triton_compile), compiles
each distinct launch with Inductor's argument types, and reads back registers a thread, spill
bytes a thread, and the bf16 wgmma / mma.sync instructions in its PTX. No timing: a spill or an
FMA loop where a tensor-core product belongs is what this shows, before a GPU is lent.

    python benchmarks/kernel_registers.py                 # d = 64 and 128 at degree 2, d = 32 at degree 3: ~2 min
    python benchmarks/kernel_registers.py --results /tmp/R.md

Writes the kernel-registers section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402
import triton  # noqa: E402

from lrcompile.bench import triton_compile  # noqa: E402
from lrcompile.bench.results import write_results_section  # noqa: E402

SECTION = "kernel-registers"
CONFIGURATIONS = ((64, 2), (32, 3), (128, 2))  # (d = d_v, degree)
# launch flags that make a kernel a different program, in the order the table shows them
FLAGS = ("POWER", "STORE_U", "GRADIENT", "CHUNKED", "REVERSE", "STORE_TOTAL")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configurations", nargs="+", default=[f"{d}:{g}" for d, g in CONFIGURATIONS],
                        help="d:degree pairs (d_v = d)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    return parser.parse_args(argv)


def _variant(kernel, kwargs) -> str:
    flags = ", ".join(f"{name}={int(kwargs[name])}" for name in FLAGS if name in kwargs)
    return f"{kernel.fn.__name__}({flags})" if flags else kernel.fn.__name__


def measure(head_dim: int, degree: int) -> list[dict]:
    rows, seen = [], set()
    for causal in (False, True):
        for kernel, args, kwargs in triton_compile.launches_of_one_call(torch.bfloat16, degree, causal, groups=2,
                                                                        head_dim=head_dim, value_dim=head_dim):
            variant = _variant(kernel, kwargs)
            if variant in seen:
                continue
            seen.add(variant)
            compiled = triton_compile.compile_for_gpu(kernel, args, kwargs, arch=90)
            rows.append(dict(head_dim=head_dim, degree=degree, kernel=variant, block=kwargs.get("BLOCK_N"),
                             **triton_compile.ptxas_report(compiled, arch=90),
                             **triton_compile.tensor_core_products(compiled.asm["ptx"], torch.bfloat16)))
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| d, degree | kernel | row tile | warps | registers | spill stores / loads (B a thread) | "
             "bf16 wgmma | bf16 mma.sync |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['head_dim']}, {row['degree']} | `{row['kernel']}` | {row['block']} | {row['warps']} | "
                     f"{row['registers']} | {row['spill_stores']} / {row['spill_loads']} | {row['wgmma']} | "
                     f"{row['mma']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_arguments(argv)
    rows = []
    for configuration in args.configurations:
        head_dim, degree = (int(part) for part in configuration.split(":"))
        rows += measure(head_dim, degree)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"Triton kernels compiled for sm_90 without a GPU: every launch of one forward and one backward (GQA, "
            f"key padding, bfloat16, causal and not, d_v = d), with Inductor's argument types; registers and spills "
            f"from `ptxas -v`, tensor-core instructions counted in the PTX. Triton {triton.__version__}, torch "
            f"{torch.__version__}, {when}. Command: `python benchmarks/kernel_registers.py`.\n\n" + table(rows))
    write_results_section(args.results, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
