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
from lrcompile.ops import algorithm, guard

IMPLEMENTATIONS = ("c", "torch")


@torch.library.custom_op("lrcompile::factored_attention", mutates_args=())
def factored_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int,
    max_error: float, on_inaccurate: str, site: str, implementation: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state S (B, H, r, d_v + 1), exact ()).

    Causally, S sums the keys every query can see at the end: the backward peels it chunk by chunk.
    Where the direct algorithm runs (lrcompile.ops.algorithm) there is no state: S is (B, H, 0, d_v + 1).
    The accuracy guard (lrcompile.ops.guard) checks `out` unless on_inaccurate is "allow"; `exact` is
    True when it replaced `out` by exact attention, which the backward then differentiates.
    """
    kernels, config = _kernels(implementation, coefficients, chunk_size)
    direct = _uses_direct(q, k, v, coefficients, causal, chunk_size)
    out, denominator, state = kernels.forward(q, k, v, key_weight, config, scale, causal, direct)
    exact = guard.check(site, out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate)
    if exact:
        out = guard.exact_attention(q, k, v, key_weight, scale, causal)
    # contiguous, as the fake kernel promises (the denominator is a column of a wider buffer)
    return out.contiguous(), denominator.contiguous(), state.contiguous(), torch.tensor(exact, device=q.device)


@factored_attention.register_fake
def _(q, k, v, key_weight, coefficients, scale, causal, chunk_size, max_error, on_inaccurate, site,
      implementation="torch"):
    state = q.new_empty(k.shape[:-2] + (_state_rows(q, k, v, coefficients, causal, chunk_size), v.shape[-1] + 1))
    exact = q.new_empty((), dtype=torch.bool)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1]), state, exact


@torch.library.custom_op("lrcompile::factored_attention_backward", mutates_args=())
def factored_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    out: torch.Tensor, denominator: torch.Tensor, state: torch.Tensor, exact: torch.Tensor,
    coefficients: list[float], scale: float, causal: bool, chunk_size: int, key_weight_grad: bool,
    implementation: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d key_weight); the last is empty unless key_weight_grad."""
    if exact.item():
        dq, dk, dv, dw = guard.exact_attention_backward(grad_out, q, k, v, key_weight, scale, causal, key_weight_grad)
        dw = dw.contiguous() if key_weight_grad else q.new_empty(0)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dw
    kernels, config = _kernels(implementation, coefficients, chunk_size)
    direct = _uses_direct(q, k, v, coefficients, causal, chunk_size)  # as the forward chose
    dq, dk, dv, dw = kernels.backward(grad_out, q, k, v, key_weight, out, denominator, state, config, scale, causal,
                                      direct, key_weight_grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dw.contiguous()


@factored_attention_backward.register_fake
def _(grad_out, q, k, v, key_weight, out, denominator, state, exact, coefficients, scale, causal, chunk_size,
      key_weight_grad, implementation="torch"):
    dw = key_weight.new_empty(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw


def _setup_context(ctx, inputs, output):
    q, k, v, key_weight, coefficients, scale, causal, chunk_size, _max_error, _on_inaccurate, _site, *rest = inputs
    out, denominator, state, exact = output
    ctx.save_for_backward(q, k, v, key_weight, out, denominator, state, exact)
    ctx.config = (list(coefficients), scale, causal, chunk_size)
    ctx.implementation = rest[0] if rest else "torch"
    ctx.mark_non_differentiable(denominator, state, exact)


def _backward(ctx, grad_out, _grad_denominator, _grad_state, _grad_exact):
    q, k, v, key_weight, out, denominator, state, exact = ctx.saved_tensors
    key_weight_grad = key_weight is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dw = torch.ops.lrcompile.factored_attention_backward(
        grad_out, q, k, v, key_weight, out, denominator, state, exact, *ctx.config, key_weight_grad,
        ctx.implementation)
    return dq, dk, dv, (dw if key_weight_grad else None), None, None, None, None, None, None, None, None


factored_attention.register_autograd(_backward, setup_context=_setup_context)


def _kernels(implementation, coefficients, chunk_size):
    """The implementation `implementation` names, and the part of a KernelConfig the kernels read."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"lrcompile::factored_attention runs the 'c' or 'torch' implementation, got "
                         f"{implementation!r} (Triton has an op of its own: lrcompile.kernels.triton)")
    return selector.kernels_for(implementation), KernelConfig(implementation, tuple(coefficients), chunk_size)


def _uses_direct(q, k, v, coefficients, causal, chunk_size) -> bool:
    """Whether this call takes the direct algorithm (lrcompile.ops.algorithm): a function of the shapes
    alone, asked by the forward, the fake kernel and the backward alike. Under dynamic shapes the
    fake kernel's answer is a guard on the lengths: a shape across the switch recompiles."""
    groups, n_q, head_dim = q.shape[2:]
    return algorithm.uses_direct(n_q, k.shape[-2], head_dim, v.shape[-1], groups, len(coefficients) - 1, causal,
                                 chunk_size, q.device.type)


def _state_rows(q, k, v, coefficients, causal, chunk_size):
    """Rows of the state output: r for the factored algorithm, 0 for the direct one (no state)."""
    if _uses_direct(q, k, v, coefficients, causal, chunk_size):
        return 0
    return feature_dim(q.shape[-1], len(coefficients) - 1)
