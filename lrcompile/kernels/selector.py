"""Which implementation runs a factored-attention call (docs/design.md section 6).

This module owns the choice; nothing else asks which kernels exist. Each implementation fills in
the interface of `lrcompile.kernels.interface` (forward, backward, one `KernelConfig`), and
`kernels_for` returns the one a config names:

    "c"       the C kernels of `lrcompile.kernels.cpu` (CPU, float32/float64, where they build)
    "triton"  the Triton kernels of `lrcompile.kernels.triton` (CUDA; CPU tensors under
              TRITON_INTERPRET=1), through the op `lrcompile::triton_factored_attention`
    "torch"   the torch sweep of `lrcompile.kernels.reference`: the readable reference every other
              implementation is tested against, and the fallback everywhere else

"c" and "torch" run inside the op `lrcompile::factored_attention` (lrcompile.ops.factored_op);
"triton" is an op of its
own, because a `triton_op` that also had a CPU kernel would break torch.compile on the CPU. So
the implementation is fixed when a site is rewritten (from the site's device) or when an eager
call starts, and travels to the kernel in a `KernelConfig`.

Under "c", who runs the chunk sweeps is decided per call (`sweep`): the C sweep (loops in C,
one head per thread, BLAS products) when the heads keep every thread busy, else the torch sweep
calling the C feature maps, several times slower at long lengths. The policy's cost model and
the report ask `choose` for both answers.

LRCOMPILE_KERNELS=c|triton|torch forces one implementation for every call. It is read at every
selection, so a benchmark can set it around a call; a value that cannot run the call raises
`KernelUnavailableError` naming the variable instead of quietly running something else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from lrcompile.kernels import cpu, reference
from lrcompile.kernels.interface import Kernels

IMPLEMENTATIONS = ("c", "triton", "torch")
ENVIRONMENT_VARIABLE = "LRCOMPILE_KERNELS"
_PREFERRED = {"cuda": "triton", "cpu": "c"}  # each device's own kernels; "torch" wherever they cannot run


class KernelUnavailableError(RuntimeError):
    """The implementation asked for (LRCOMPILE_KERNELS, or a KernelConfig) cannot run this call."""


@dataclass(frozen=True)
class Choice:
    """What runs a call: the implementation, and who runs its chunk sweeps."""

    implementation: str  # "c" | "triton" | "torch"
    sweep: str           # "c" (cpu.Sweep) | "torch" (reference.Sweeps) | "triton"
    reason: str = ""     # why not the device's own kernels, or that LRCOMPILE_KERNELS chose; "" otherwise

    @property
    def label(self) -> str:
        """'c', 'triton', 'torch', or 'c features, torch sweep' (the slower CPU path)."""
        if self.sweep == self.implementation:
            return self.implementation
        return f"{self.implementation} features, {self.sweep} sweep"


def forced() -> str | None:
    """The implementation LRCOMPILE_KERNELS forces, read now; None when unset or empty."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if not value:
        return None
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r} is not an implementation; "
                         f"accepted: {', '.join(IMPLEMENTATIONS)} (or unset, to choose by device)")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select(device, dtype: torch.dtype, degree: int, head_dim: int, value_dim: int) -> str:
    """The implementation that runs a call on `device` computing in `dtype` (see compute_dtype).

    LRCOMPILE_KERNELS when set (KernelUnavailableError if it cannot run the call); otherwise
    "triton" on CUDA and "c" on the CPU where they can, else "torch".
    """
    device = torch.device(device).type
    wanted = forced()
    if wanted is not None:
        problem = why_not(wanted, device, dtype, degree, head_dim, value_dim)
        if problem:
            raise KernelUnavailableError(f"{ENVIRONMENT_VARIABLE}={wanted} cannot run this call: {problem}")
        return wanted
    preferred = _PREFERRED.get(device)
    if preferred and not why_not(preferred, device, dtype, degree, head_dim, value_dim):
        return preferred
    return "torch"


def check(implementation: str, device, dtype: torch.dtype, degree: int, head_dim: int, value_dim: int) -> None:
    """KernelUnavailableError unless `implementation` can run this call (a config's, checked at the call)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    problem = why_not(implementation, torch.device(device).type, dtype, degree, head_dim, value_dim)
    if problem:
        raise KernelUnavailableError(f"the {implementation!r} kernels cannot run this call: {problem}")


def why_not(implementation: str, device: str, dtype: torch.dtype, degree: int, head_dim: int, value_dim: int) -> str:
    """Why `implementation` cannot run such a call; "" when it can."""
    if implementation == "torch":
        return ""
    if implementation == "c":
        if device != "cpu":
            return f"the C kernels run CPU tensors, this call's are on {device}"
        if dtype not in cpu.SUFFIX:
            return f"the C kernels compute in float32 or float64, not {dtype}"
        if cpu.library() is None:
            return f"the C kernels are unavailable ({cpu.status()})"
        return ""
    if implementation == "triton":
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the Triton kernels run CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if device not in ("cpu", "cuda"):
            return f"the Triton kernels run CUDA tensors, this call's are on {device}"
        try:
            from lrcompile.kernels import triton as triton_kernels
        except Exception as error:  # noqa: BLE001 - an ImportError, or triton failing to initialise
            return f"triton is not importable ({type(error).__name__}: {error})"
        # unsupported_reason() reads shapes and a dtype only: stand-ins, so that no tensor is made
        # (and traced into the graph) while torch.compile traces the op
        query, value = SimpleNamespace(shape=(head_dim,), dtype=dtype), SimpleNamespace(shape=(value_dim,), dtype=dtype)
        problem = triton_kernels.unsupported_reason(query, value, [0.0] * (degree + 1))
        if problem:
            return f"the Triton kernels do not take {problem}"
        return ""
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def sweep(implementation: str, heads: int, dtype: torch.dtype, threads: int | None = None) -> str:
    """Who runs the chunk sweeps of a call with `heads` (batch x key/value heads) independent problems.

    Under "c": the C sweep where there are enough heads to give each of torch's threads whole
    heads (or one thread), and the BLAS torch links is found; else the torch sweep, which splits
    every product over the threads and calls the C feature maps per chunk.
    """
    if implementation != "c":
        return implementation
    return "c" if cpu.runs_c_sweep(heads, dtype, threads) else "torch"


def choose(device, dtype: torch.dtype, degree: int, head_dim: int, value_dim: int, heads: int) -> Choice:
    """The implementation and the sweep a call would run with, as `select` and `sweep` decide."""
    implementation = select(device, dtype, degree, head_dim, value_dim)
    device = torch.device(device).type
    preferred = _PREFERRED.get(device)
    if forced() is not None:
        reason = f"{ENVIRONMENT_VARIABLE}={implementation}"
    elif preferred is not None and implementation != preferred:
        reason = why_not(preferred, device, dtype, degree, head_dim, value_dim)
    else:
        reason = ""
    return Choice(implementation, sweep(implementation, heads, dtype), reason)


def kernels_for(implementation: str) -> Kernels:
    """The implementation of the kernel interface that `implementation` names."""
    if implementation == "c":
        return cpu
    if implementation == "torch":
        return reference
    if implementation == "triton":
        from lrcompile.kernels import triton as triton_kernels  # imports triton only where it runs
        return triton_kernels.TritonKernels  # static methods: the class itself fills in the interface
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
