"""Running the attention sweeps of independent heads on separate CPU cores.

The factored sweeps are chains of matrix products with r x (d_v + 1) states and r x C feature
blocks. Split across cores inside every product, each core reads blocks the other one wrote and
the two synchronise hundreds of times per chunk; given whole heads instead, each core keeps its
features and states in its own cache and runs single-threaded products back to back. Torch
operations release the GIL, so Python threads can run the heads side by side (the C sweep of
lrcompile.kernels.cpu does the same without Python in between, and is used instead where it builds).

Used only on the CPU, with more (batch x head) problems than threads: with fewer, or on an
accelerator, the sweep runs as it is, one multi-threaded operation at a time.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import torch

_lock = threading.Lock()
_pool: dict = {}


def split_heads(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn(*tensors) -> tuple of tensors, all with heads on axis 0, computed head group by head group.

    fn must treat heads independently (axis 0 is a batch axis for everything it does); the result
    is the same as fn(*tensors) up to the summation order of the matrix products.
    """
    threads = torch.get_num_threads()
    heads = tensors[0].shape[0]
    if not worth_splitting(tensors[0], heads, threads):
        return fn(*tensors)
    parts = [t.tensor_split(threads) for t in tensors]
    pool = _executor(threads)
    torch.set_num_threads(1)  # each head group on one core; restored before anything else runs
    try:
        futures = [pool.submit(_no_grad_call, fn, [p[i] for p in parts]) for i in range(threads)]
        results = [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)
    return tuple(torch.cat(pieces) for pieces in zip(*results))


def worth_splitting(like: torch.Tensor, heads: int, threads: int) -> bool:
    """Whether `heads` independent problems keep `threads` CPU threads busy."""
    return like.device.type == "cpu" and fills_threads(heads, threads)


def fills_threads(heads: int, threads: int) -> bool:
    """Whether `heads` whole problems, split evenly enough, keep `threads` (>= 2) threads busy."""
    if threads < 2 or heads < threads:
        return False
    # uneven groups leave a core idle for a whole group's time: only when that is small
    return heads % threads == 0 or heads >= 4 * threads


def _no_grad_call(fn, args):
    with torch.no_grad():  # grad mode is per thread: workers start with it on
        return fn(*args)


def _executor(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    # a forked child inherits the pool object but not its threads: make a new one there
    key = (os.getpid(), threads)
    with _lock:
        if key not in _pool:
            for (pid, _), stale in _pool.items():
                if pid == os.getpid():
                    stale.shutdown(wait=False)
            _pool.clear()
            _pool[key] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="lrcompile-heads")
        return _pool[key]
