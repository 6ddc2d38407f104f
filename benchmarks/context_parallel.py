"""Context parallelism: bytes exchanged per layer against ring attention, and step time on gloo ranks.

Bytes. A rank of lrcompile.ops.context_parallel exchanges states, r (d_v + 1) numbers per head, whatever
n is; ring attention (torch's context_parallel, Megatron's, ring-flash-attention) passes its keys
and values round the ring: (P - 1) n / P (d + d_v) per head forward, and keys, values and their
gradient accumulators backward. Measured here for 2 and 4 gloo ranks by counting the payloads of
every collective of one forward + backward (lrcompile.ops.context_parallel.counting_payloads) at two
lengths; computed beyond (n = 64k .. 1M, P = 2 .. 64) from the same formulas, which the
measurement checks. Bytes are what one rank sends under ring algorithms (an all-reduce of M sends
2 (P - 1) / P M, an all-gather of M per rank (P - 1) M, a reduce-scatter of P M (P - 1) M).

Step time. One forward + backward of context_parallel_attention on P = 2 and 4 gloo ranks (one
torch thread each, on this machine's cores) against one process of lowrank_attention on the whole
sequence (one thread), median of --repeats runs; a rank's time is the slowest rank's.

    .venv/bin/python benchmarks/context_parallel.py                       # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/context_parallel.py --time-n 2048 --repeats 1 --results /tmp/R.md

Writes the context-parallel section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lrcompile import lowrank_attention  # noqa: E402
from lrcompile.ops.context_parallel import (collectives, context_parallel_attention, counting_payloads,  # noqa: E402
                                            ring_attention_bytes)
from lrcompile.bench.machine import machine_description  # noqa: E402
from lrcompile.bench.results import write_results_section  # noqa: E402
from lrcompile.math.features import feature_dim  # noqa: E402

SECTION = "context-parallel"
LENGTHS = (65536, 131072, 262144, 524288, 1048576)
WORLD_SIZES = (2, 4, 8, 16, 32, 64)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--count-n", type=int, nargs=2, default=[512, 2048], help="lengths whose payloads are counted")
    parser.add_argument("--time-n", type=int, default=4096, help="sequence length of the step-time runs")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    return parser.parse_args(argv)


# ---- the ranks ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world_size, port, out_dir, task, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    torch.save(task(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(task, world_size, *args):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(world_size, _free_port(), out_dir, task, args), nprocs=world_size,
                           start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(world_size)]


def _inputs(batch_heads, n, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, batch_heads, n, head_dim, generator=generator).requires_grad_(True) for _ in range(3)]


def count_payloads(rank, world_size, lengths, head_dim, degree):
    """{(n, causal): [(op, bytes handed to it)]} of one forward + backward, one head, float32."""
    counted = {}
    for n in lengths:
        for causal in (False, True):
            q, k, v = _inputs(1, n // world_size, head_dim, rank)
            with counting_payloads() as payloads:
                out = context_parallel_attention(q, k, v, is_causal=causal, degree=degree, group=dist.group.WORLD,
                                                 check_shapes=False)
                out.sum().backward()
            counted[(n, causal)] = list(payloads)
    return counted


def step_times(rank, world_size, n, heads, head_dim, degree, repeats):
    """{causal: [seconds of each forward + backward]} on this rank's slice (P = 1: the whole sequence)."""
    times = {}
    for causal in (False, True):
        q, k, v = _inputs(heads, n // world_size, head_dim, rank)
        runs = []
        for _ in range(repeats + 1):  # the first warms up
            dist.barrier()
            start = time.perf_counter()
            context_parallel_attention(q, k, v, is_causal=causal, degree=degree, group=dist.group.WORLD,
                                       check_shapes=False).sum().backward()
            runs.append(time.perf_counter() - start)
        times[causal] = runs[1:]
    return times


def one_process_times(n, heads, head_dim, degree, repeats):
    torch.set_num_threads(1)
    times = {}
    for causal in (False, True):
        q, k, v = _inputs(heads, n, head_dim, 0)
        runs = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            lowrank_attention(q, k, v, is_causal=causal, degree=degree).sum().backward()
            runs.append(time.perf_counter() - start)
        times[causal] = runs[1:]
    return times


# ---- bytes --------------------------------------------------------------------------------------

def sent_bytes(op: str, payload: int, world_size: int) -> float:
    if op == "all_reduce":
        return 2 * (world_size - 1) / world_size * payload
    if op == "all_gather":
        return (world_size - 1) * payload
    return (world_size - 1) / world_size * payload


def predicted_bytes(causal, world_size, head_dim, degree, element_bytes=4) -> float:
    return sum(c.bytes_sent(world_size, element_bytes)
               for c in collectives(causal, 1, head_dim, head_dim, degree, world_size))


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _size(n: int) -> str:
    return f"{n // 1024}k" if n < 1 << 20 else f"{n >> 20}M"


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def main(argv=None):
    args = parse_arguments(argv)
    d, degree = args.head_dim, args.degree
    measured = {}
    for world_size in (2, 4):
        counted = run_ranks(count_payloads, world_size, tuple(args.count_n), d, degree)[0]
        for (n, causal), payloads in counted.items():
            measured[(world_size, n, causal)] = sum(sent_bytes(op, size, world_size) for op, size in payloads)
    for (world_size, n, causal), value in measured.items():
        predicted = predicted_bytes(causal, world_size, d, degree)
        assert abs(value - predicted) < 1e-6 * predicted, (world_size, n, causal, value, predicted)
    timed = {"one process": one_process_times(args.time_n, args.heads, d, degree, args.repeats)}
    for world_size in (1, 2, 4):
        per_rank = run_ranks(step_times, world_size, args.time_n, args.heads, d, degree, args.repeats)
        timed[world_size] = {causal: [max(rank[causal][i] for rank in per_rank) for i in range(args.repeats)]
                             for causal in (False, True)}
    text = markdown(args, measured, timed)
    print(text)
    write_results_section(args.results, SECTION, text)


def markdown(args, measured, timed) -> str:
    d, degree = args.head_dim, args.degree
    r = feature_dim(d, degree)
    short, long = args.count_n
    lines = [
        f"Context parallelism: bytes one rank sends per layer and head, forward + backward, float32, d = d_v = {d}, "
        f"degree {degree} (r = {r}): lrcompile.ops.context_parallel's states against ring attention's keys and values. "
        f"Measured by counting every collective's payload on 2 and 4 gloo ranks at n = {short} and {long} "
        f"(the same bytes at both lengths, equal to the formula), computed beyond. {machine_description()}. "
        f"Command: `.venv/bin/python benchmarks/context_parallel.py`.",
        "",
        "| ranks | lrcompile non-causal | lrcompile causal | measured (n = " + f"{short}, {long})" + " |",
        "|---|---|---|---|",
    ]
    for world_size in WORLD_SIZES:
        ours = [predicted_bytes(causal, world_size, d, degree) for causal in (False, True)]
        seen = [measured.get((world_size, n, causal)) for n in (short, long) for causal in (False, True)]
        shown = "-" if None in seen else " / ".join(_bytes(x) for x in seen)
        lines.append(f"| {world_size} | {_bytes(ours[0])} | {_bytes(ours[1])} | {shown} |")
    lines += ["", "Ring attention sends 3 (P - 1) (n / P) (d + d_v) numbers per rank (keys and values forward; keys, "
              "values and their gradients backward); the ratio is ring's bytes over lrcompile's "
              "(non-causal / causal):", "",
              "| n | " + " | ".join(f"P = {p}: ring" for p in WORLD_SIZES) + " |",
              "|---|" + "---|" * len(WORLD_SIZES)]
    for n in LENGTHS:
        cells = []
        for world_size in WORLD_SIZES:
            ring = ring_attention_bytes(n, world_size, d, d, 4)
            ratios = [ring / predicted_bytes(causal, world_size, d, degree) for causal in (False, True)]
            cells.append(f"{_bytes(ring)} ({ratios[0]:.0f}x / {ratios[1]:.0f}x)")
        lines.append(f"| {_size(n)} | " + " | ".join(cells) + " |")
    lines += ["", f"Step time: one forward + backward, {args.heads} heads, n = {args.time_n} in all, d = {d}, degree "
              f"{degree}, float32, one torch thread per process, median of {args.repeats} (a step of P ranks is its "
              f"slowest rank's); on this machine's cores, shared by the ranks.", "",
              "Speed-ups are against one rank of the same op (the same sweeps, collectives of one). Non-causal, "
              "the context-parallel ops run the torch sweeps over the C feature maps (key state, then query "
              "outputs); causal, a rank's slice runs lowrank_attention's fused C sweep plus one more pass of the "
              "feature maps for the prefix S_<p (queries, forward and backward) and for R_>p (keys, backward). "
              f"P ranks share this machine's {os.cpu_count()} cores (and other jobs' load): these times show "
              "the overheads, not scaling.", "",
              "| run | non-causal ms | causal ms | non-causal speed-up | causal speed-up |", "|---|---|---|---|---|"]
    for world_size, times in timed.items():
        medians = [_median(times[causal]) for causal in (False, True)]
        base = [_median(timed[1][causal]) for causal in (False, True)]
        label = (f"{world_size} gloo rank{'s' if world_size > 1 else ''}" if isinstance(world_size, int)
                 else "one process, lowrank_attention")
        lines.append(f"| {label} | {medians[0] * 1e3:.1f} | {medians[1] * 1e3:.1f} | "
                     f"{base[0] / medians[0]:.2f}x | {base[1] / medians[1]:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
