"""The attention methods `lrcompile bench` compares, and how each one's step is run.

    sdpa, math, inductor              exact attention: SDPA, eager math, the math spelling by Inductor
    lowrank, lowrank_compiled         lrcompile's op, eager and through the backend
    lowrank_torch, lowrank_triton     the op with LRCOMPILE_KERNELS forcing one implementation

`make_method` returns attend(q, k, v); what a "step" is and how it is timed is lrcompile.bench.timing.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from lrcompile.compile.backend import compile_graph
from lrcompile.compile.policy import Policy
from lrcompile.ops.attention import lowrank_attention

METHODS = ("sdpa", "math", "inductor", "lowrank", "lowrank_compiled", "lowrank_torch", "lowrank_triton")
DEFAULT_METHODS = ("sdpa", "math", "inductor", "lowrank", "lowrank_compiled")
LOWRANK_METHODS = ("lowrank", "lowrank_compiled", "lowrank_torch", "lowrank_triton")
COMPILED_METHODS = ("inductor", "lowrank_compiled")
FORCED_KERNELS = {"lowrank_torch": "torch", "lowrank_triton": "triton"}  # method -> LRCOMPILE_KERNELS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MethodSettings(Protocol):
    """What a method reads of a run's settings (lrcompile.bench.command.Settings has it all)."""

    head_dim: int
    degree: int
    score_range: float
    device: str
    dtype: str

    @property
    def policy(self) -> Policy: ...

def math_attention(q, k, v, is_causal: bool):
    """Exact attention as models spell it (nanoGPT's non-flash path): weights materialised."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, n_q, n_k)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=-1) @ v


class RewriteRecord:
    """How many attention sites the lrcompile backend rewrote in graphs that Inductor then compiled.

    So that a row labelled lowrank_compiled is known to run the low-rank op: when rewriting or
    compiling the rewritten graph fails, the backend falls back to the original graph (with a
    warning), and that graph's sites are not counted.
    """

    def __init__(self):
        self.rewritten_sites = 0

    def backend(self, policy: Policy):
        """lrcompile.backend(policy), plus the record."""
        from torch._inductor.compile_fx import compile_fx

        def lrcompile_recorded(gm, example_inputs):
            sites = []

            def inductor(graph_module, inputs):
                compiled = compile_fx(graph_module, inputs)
                if graph_module is not gm:  # the rewritten copy compiled
                    self.rewritten_sites += sum(sites)
                return compiled

            return compile_graph(gm, example_inputs, policy, inner=inductor,
                                 on_rewrite=lambda rewrite: sites.append(len(rewrite.rewritten)))
        return lrcompile_recorded


@contextlib.contextmanager
def forced_kernels(implementation: str):
    """LRCOMPILE_KERNELS=implementation for the duration (read by lrcompile at every call, forward
    and backward). For "torch", LRCOMPILE_NATIVE=0 as well, which keeps the C kernels out where
    the implementation selector does not yet read LRCOMPILE_KERNELS."""
    names = ("LRCOMPILE_KERNELS", "LRCOMPILE_NATIVE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["LRCOMPILE_KERNELS"] = implementation
    if implementation == "torch":
        os.environ["LRCOMPILE_NATIVE"] = "0"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_method(method: str, settings: MethodSettings, causal: bool, record: RewriteRecord | None = None) -> Callable:
    """attend(q, k, v) -> out for one method and mask. Compiled methods compile on first call."""
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if method == "math":
        return lambda q, k, v: math_attention(q, k, v, causal)
    if method == "lowrank" or method in FORCED_KERNELS:
        return lambda q, k, v: lowrank_attention(q, k, v, is_causal=causal, degree=settings.degree,
                                                 bound=settings.score_range)
    if method == "inductor":
        # CPU: one static graph per n (dynamo is reset per configuration). CUDA: one dynamic graph
        # for all n, so that the run compiles once per mask and dtype, not once per n.
        compiled = torch.compile(math_attention, backend="inductor", dynamic=settings.device != "cpu")
    elif method == "lowrank_compiled":
        # dynamic=False: one static graph per n, as the policy decides per shape; with automatic
        # dynamic shapes a second n would turn the chunk loop symbolic.
        record = record if record is not None else RewriteRecord()
        compiled = torch.compile(math_attention, backend=record.backend(settings.policy), dynamic=False)
    else:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    return lambda q, k, v: compiled(q, k, v, causal)


def inductor_fuses_math_attention(causal: bool, settings: MethodSettings) -> bool:
    """Whether Inductor's own pattern matcher (fuse_attention) turns the math spelling into SDPA.

    Then `inductor` runs SDPA's kernel and needs no n x n memory, so the memory budget does not
    apply to it. Probed once on a small shape; the counter is Inductor's record of replacements.
    Inductor's caches are off for the probe: a cache hit skips the pattern matcher and its counter.
    """
    import torch._functorch.config
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["inductor"]["fuse_attention"]
    q, k, v = (torch.randn(1, 2, 256, settings.head_dim, device=settings.device, dtype=DTYPES[settings.dtype],
                           requires_grad=True) for _ in range(3))
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(math_attention, backend="inductor", dynamic=False)(q, k, v, causal).sum().backward()
    torch._dynamo.reset()
    return counters["inductor"]["fuse_attention"] > before


def failure_tolerant(step: Callable, failures: dict, name: str) -> Callable:
    """step, except that an exception is recorded in failures[name] and later calls are skipped:
    one method that cannot run (no kernel for this device, out of memory) does not end the run."""
    def run():
        if name not in failures:
            try:
                return step()
            except Exception as error:  # noqa: BLE001 - reported as the row's reason
                failures[name] = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return (math.nan, math.nan)
    return run


def with_forced_kernels(implementation: str, step: Callable) -> Callable:
    def run():
        with forced_kernels(implementation):
            return step()
    return run
