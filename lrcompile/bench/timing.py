"""Timing steps side by side: interleaved runs, medians, the device's matmul rate, progress bars.

Every speed comparison in lrcompile (`lrcompile bench`, `lrcompile calibrate`, the demo, the
benchmarks) times its methods with `interleaved_runs`, round-robin within every repeat, so that
load drift on a shared machine hits all of them alike and is never read as a speed-up.

On CUDA a step is timed with CUDA events on the current stream (the host returns long before the
kernels finish); on the CPU with the wall clock.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

MATMUL_SIZE = 2048


class StepClock:
    """Marks within one step, read after the step: perf_counter on the CPU, CUDA events on CUDA."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds_since_first(self) -> tuple[float, ...]:
        """Seconds from the first mark to each later one."""
        if self.cuda:
            self.marks[-1].synchronize()
            return tuple(self.marks[0].elapsed_time(mark) / 1e3 for mark in self.marks[1:])
        return tuple(mark - self.marks[0] for mark in self.marks[1:])


def training_step_times(attend: Callable, q, k, v, grad_out) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of one step out = attend(q, k, v); out.backward."""
    q.grad = k.grad = v.grad = None
    clock = StepClock(q.device)
    if clock.cuda:
        torch.cuda.synchronize(q.device)  # nothing queued before the step counts in it
    clock.mark()
    out = attend(q, k, v)
    clock.mark()
    out.backward(grad_out)
    clock.mark()
    return clock.seconds_since_first()


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


def measure_matmul_rate(size: int = MATMUL_SIZE, repeats: int = 5, device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> dict:
    """The device's torch.mm rate on a size^3 product of `dtype`, median of `repeats` after a warm-up:
    the reference against which achieved FLOP rates are quoted."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    runs = []
    for _ in range(repeats):
        clock = StepClock(device)
        clock.mark()
        torch.mm(a, b)
        clock.mark()
        runs.append(clock.seconds_since_first()[0])
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "runs": runs,
            "gflops": 2 * size**3 / median(runs) / 1e9}


def progress_bar():
    """A factory of tqdm bars on stderr (reports go to stdout), gone when finished."""
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("lrcompile's measurements need tqdm for their progress bars: "
                          "pip install 'lrcompile[bench]'") from None

    def factory(**kwargs):
        return tqdm(leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)
    return factory
