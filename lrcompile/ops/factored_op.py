"""The op `lrcompile::factored_attention` and its backward: torch.library registrations, fake kernels, autograd.

The forward and the explicit backward are two custom ops, so that under torch.compile
AOTAutograd's forward graph holds one `lrcompile.factored_attention` call and its backward graph
one `lrcompile.factored_attention_backward` call: Inductor runs the same chunked kernels as eager
mode, nothing unrolls with n, and sizes stay symbolic.

Each op asks `lrcompile.ops.algorithm` whether the call is computed directly (a function of the
shapes, asked alike by the forward, the fake kernel and the backward), runs the implementation
its `implementation` argument names ("c" or "torch", through the kernel interface of
`lrcompile.kernels.interface`; Triton has ops of its own, lrcompile.kernels.triton), and checks
the result with the accuracy guard (`lrcompile.ops.guard`).
"""

from __future__ import annotations

import torch

from lrcompile.kernels import selector
from lrcompile.kernels.interface import KernelConfig
from lrcompile.math.features import feature_dim
from lrcompile.ops import guard
from lrcompile.ops import algorithm as algorithms  # the ops' `algorithm` argument names one of them

IMPLEMENTATIONS = ("c", "torch")


@torch.library.custom_op("lrcompile::factored_attention", mutates_args=())
def factored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int,
    max_error: float, on_inaccurate: str, site: str, implementation: str = "torch",
    log_key_weight: torch.Tensor | None = None, algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state S (B, H, r, d_v + 1), exact ()).

    Causally, S sums the keys every query can see at the end: the backward peels it chunk by chunk.
    Where the direct algorithm runs (lrcompile.ops.algorithm) there is no state: S is (B, H, 0, d_v + 1).
    The accuracy guard (lrcompile.ops.guard) checks `out` unless on_inaccurate is "allow"; `exact` is
    True when it replaced `out` by exact attention, which the backward then differentiates.
    `log_key_weight` (B, H, n_k): a causal float mask's log w = m - peak, given beside
    key_weight = e^{log w}: the guard detects rows whose weights underflow and computes exact
    attention from it; the gradient of a float mask then flows through it instead of key_weight.
    The backward checks its own gradients as the forward checks `out` (guard.check_backward).
    `algorithm`: "auto" asks lrcompile.ops.algorithm's cost rule (a guard on the lengths under
    dynamic shapes); "factored" or "direct" fixes it (lrcompile.export under dynamic shapes: no guard).
    """
    kernels, config = _kernels(implementation, coefficients, chunk_size)
    direct = _uses_direct(q, k, v, coefficients, causal, chunk_size, algorithm)
    out, denominator, state = kernels.forward(q, k, v, key_weight, config, scale, causal, direct)
    exact = guard.check(site, out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate, log_key_weight)
    if exact:
        out = guard.exact_attention(q, k, v, key_weight, scale, causal, log_weight=log_key_weight)
    # contiguous, as the fake kernel promises (the denominator is a column of a wider buffer)
    return out.contiguous(), denominator.contiguous(), state.contiguous(), torch.tensor(exact, device=q.device)


@factored_attention.register_fake
def _(q, k, v, key_weight, coefficients, scale, causal, chunk_size, max_error, on_inaccurate, site,
      implementation="torch", log_key_weight=None, algorithm="auto"):
    rows = _state_rows(q, k, v, coefficients, causal, chunk_size, algorithm)
    state = q.new_empty(k.shape[:-2] + (rows, v.shape[-1] + 1))
    exact = q.new_empty((), dtype=torch.bool)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1]), state, exact


@torch.library.custom_op("lrcompile::factored_attention_backward", mutates_args=())
def factored_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    out: torch.Tensor, denominator: torch.Tensor, state: torch.Tensor, exact: torch.Tensor,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int, key_weight_grad: bool,
    implementation: str = "torch", log_key_weight: torch.Tensor | None = None, max_error: float = 0.0,
    on_inaccurate: str = "allow", site: str = "", algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d key_weight); the last is empty unless key_weight_grad, and is d log_key_weight
    where log_key_weight is given. Unless the forward already returned exact attention, the guard
    checks the polynomial's gradients first (max_error, on_inaccurate, site: as the forward's)."""
    if exact.item() or guard.check_backward(site, grad_out, q, k, v, key_weight, coefficients, scale, causal,
                                            max_error, on_inaccurate):
        dq, dk, dv, dw = guard.exact_attention_backward(grad_out, q, k, v, key_weight, scale, causal, key_weight_grad,
                                                        log_weight=log_key_weight)
        dw = dw.contiguous() if key_weight_grad else q.new_empty(0)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dw
    kernels, config = _kernels(implementation, coefficients, chunk_size)
    direct = _uses_direct(q, k, v, coefficients, causal, chunk_size, algorithm)  # as the forward chose
    dq, dk, dv, dw = kernels.backward(grad_out, q, k, v, key_weight, out, denominator, state, config, scale, causal,
                                      direct, key_weight_grad)
    if key_weight_grad and log_key_weight is not None:
        dw = dw * key_weight  # d/d log w = w d/dw
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dw.contiguous()


@factored_attention_backward.register_fake
def _(grad_out, q, k, v, key_weight, out, denominator, state, exact, coefficients, scale, causal, chunk_size,
      key_weight_grad, implementation="torch", log_key_weight=None, max_error=0.0, on_inaccurate="allow", site="",
      algorithm="auto"):
    dw = key_weight.new_empty(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, coefficients, scale, causal, chunk_size, max_error, on_inaccurate, site, *rest = inputs
    implementation = rest[0] if rest else "torch"
    log_key_weight = rest[1] if len(rest) > 1 else None
    ctx.algorithm = rest[2] if len(rest) > 2 else "auto"
    out, denominator, state, exact = output
    ctx.save_for_backward(q, k, v, key_weight, out, denominator, state, exact, log_key_weight)
    ctx.config = (list(coefficients), scale, causal, chunk_size)
    ctx.guard = (max_error, on_inaccurate, site)
    ctx.implementation = implementation
    ctx.mark_non_differentiable(denominator, state, exact)


def _backward(ctx, grad_out, _grad_denominator, _grad_state, _grad_exact):
    q, k, v, key_weight, out, denominator, state, exact, log_key_weight = ctx.saved_tensors
    # A float mask's gradient flows through log_key_weight where that is given, else through key_weight.
    through_log = log_key_weight is not None
    key_weight_grad = key_weight is not None and ctx.needs_input_grad[12 if through_log else 3]
    dq, dk, dv, dw = torch.ops.lrcompile.factored_attention_backward(
        grad_out, q, k, v, key_weight, out, denominator, state, exact, *ctx.config, key_weight_grad,
        ctx.implementation, log_key_weight, *ctx.guard, ctx.algorithm)
    dw = dw if key_weight_grad else None
    return (dq, dk, dv, None if through_log else dw, None, None, None, None, None, None, None, None,
            dw if through_log else None, None)


factored_attention.register_autograd(_backward, setup_context=_setup_context)


def _kernels(implementation, coefficients, chunk_size):
    """The implementation `implementation` names, and the part of a KernelConfig the kernels read."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"lrcompile::factored_attention runs the 'c' or 'torch' implementation, got "
                         f"{implementation!r} (Triton has an op of its own: lrcompile.kernels.triton)")
    return selector.kernels_for(implementation), KernelConfig(implementation, tuple(coefficients), chunk_size)


def _uses_direct(q, k, v, coefficients, causal, chunk_size, algorithm="auto") -> bool:
    """Whether this call takes the direct algorithm (lrcompile.ops.algorithm): a function of the shapes
    alone, asked by the forward, the fake kernel and the backward alike. Under dynamic shapes the
    fake kernel's answer is a guard on the lengths: a shape across the switch recompiles. A fixed
    `algorithm` ("direct" or "factored") decides without looking at the shapes."""
    if algorithm != "auto":
        return algorithm == "direct"
    groups, n_q, head_dim = q.shape[2:]
    return algorithms.uses_direct(n_q, k.shape[-2], head_dim, v.shape[-1], groups, len(coefficients) - 1,
                                  causal, chunk_size, q.device.type)


def _state_rows(q, k, v, coefficients, causal, chunk_size, algorithm="auto"):
    """Rows of the state output: r for the factored algorithm, 0 for the direct one (no state)."""
    if _uses_direct(q, k, v, coefficients, causal, chunk_size, algorithm):
        return 0
    return feature_dim(q.shape[-1], len(coefficients) - 1)
