"""The run-time accuracy guard (docs/design.md §3, "approximate softmax"): every call checks itself.

A polynomial of low degree is accurate only while the scores stay in a narrow range, and trained
models leave that range (docs/design.md §3). So each call of a guarded site
estimates its own output error against exact softmax attention, and acts on it:

    error = max over sampled query rows i, heads h of  max_c |out_ic - exact_ic| / max_jc |v_jc|

(the normalisation of the Alman-Song bound, `ExpPolynomial.output_error_factor`). The sampled rows
are the rows of largest |q'| in every head, whose scores are the widest, and rows spread evenly
over the sequence; their exact attention costs O(m n d) for m = SAMPLED_ROWS rows, against the
O(n r d) of the factored call. If the estimate exceeds `max_error`, `on_inaccurate` says what
happens: "exact" computes the call exactly (and its backward follows), "warn" warns once per
site, "error" raises, "allow" never checks (the polynomial is the model).

Everything here works in the kernel layout of `lrcompile.kernels.reference` (q (B, H, G, n_q, d), k, v
(B, H, n_k, .), key weights (B, H, n_k)), where a row whose keys all have weight zero is zero,
as SDPA returns for a fully masked row. Counters per site are kept for `lrcompile.stats()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ON_INACCURATE = ("exact", "warn", "error", "allow")
SAMPLED_ROWS = 32  # half the rows of largest |q'|, half spread evenly
EXACT_QUERY_CHUNK = 1024  # query rows per exact SDPA call, so a causal mask never spans n x n


class InaccurateAttentionError(RuntimeError):
    """Raised under Policy(on_inaccurate="error") by a call whose estimated error exceeds max_error."""


@dataclass
class SiteStats:
    """What the guard saw at one site since the last `reset_stats()`."""

    calls: int = 0
    fallbacks: int = 0          # calls that returned exact attention
    largest_error: float = 0.0  # largest estimated error of a checked call (0.0 if none was checked)
    compile_failures: int = 0   # compiles of a graph with this site rewritten that failed, so it ran exact
    compile_error: str = ""     # the last such failure, as "ErrorType: message"

    def record(self, error: float | None, fell_back: bool):
        self.calls += 1
        self.fallbacks += int(fell_back)
        if error is not None and not math.isnan(error):
            self.largest_error = max(self.largest_error, error)


_STATS: dict[str, SiteStats] = {}
_WARNED: set[str] = set()
_MEASURING: list[dict[str, "Measurement"]] = []


def stats() -> dict[str, SiteStats]:
    """Per-site counters of the guard, keyed by site label ("module.path:node"), as copies."""
    return {site: dataclasses.replace(s) for site, s in _STATS.items()}


def record_compile_failure(site: str, error: str):
    """Count a failed compile of a graph in which `site` was rewritten (lrcompile.compile.backend keeps it exact)."""
    counters = _STATS.setdefault(site, SiteStats())
    counters.compile_failures += 1
    counters.compile_error = error


def reset_stats():
    """Clear the counters, and the once-per-site warnings of on_inaccurate="warn"."""
    _STATS.clear()
    _WARNED.clear()


@dataclass
class Measurement:
    """One site's error on given inputs, for `explain`: the whole output against exact, and the
    guard's sampled estimate (which decides)."""

    measured_error: float = 0.0
    estimated_error: float = 0.0
    would_fall_back: bool = False


@contextlib.contextmanager
def measuring():
    """Within this block, guarded calls also measure their error on every row, record it in the
    yielded dict {site: Measurement} instead of the global counters, and warn or raise nothing."""
    measured: dict[str, Measurement] = {}
    _MEASURING.append(measured)
    try:
        yield measured
    finally:
        _MEASURING.remove(measured)


def check_settings(max_error, on_inaccurate):
    """ValueError unless max_error is a finite number >= 0 and on_inaccurate one of ON_INACCURATE
    (what the op and the Policy both accept)."""
    if on_inaccurate not in ON_INACCURATE:
        raise ValueError(f"on_inaccurate must be one of {ON_INACCURATE}, got {on_inaccurate!r}")
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error < math.inf:
        raise ValueError(f"max_error must be a finite number >= 0, got {max_error!r}")


def check(site, out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate) -> bool:
    """Estimate the error of `out` (B, H, G, n_q, d_v), record it, act by `on_inaccurate`.

    Returns True when the caller must return exact attention instead of `out`.
    """
    if on_inaccurate == "allow" and not _MEASURING:
        _STATS.setdefault(site, SiteStats()).record(None, False)
        return False
    error = estimate_error(out, q, k, v, key_weight, scale, causal)
    inaccurate = not error <= max_error  # NaN counts as inaccurate
    if _MEASURING:
        exact = exact_attention(q, k, v, key_weight, scale, causal)
        _MEASURING[-1][site] = Measurement(relative_error(out, exact, v), error, inaccurate)
        return False
    fall_back = inaccurate and on_inaccurate == "exact"
    _STATS.setdefault(site, SiteStats()).record(error, fall_back)
    if inaccurate and on_inaccurate == "error":
        raise InaccurateAttentionError(
            f"lrcompile: attention site {site} has an estimated output error of {error:.3g} against exact "
            f"attention, above Policy(max_error={max_error:g}); raise max_error, use a higher degree, or set "
            f"on_inaccurate to 'exact' (fall back) or 'allow' (train with the polynomial)")
    if inaccurate and on_inaccurate == "warn" and site not in _WARNED:
        _WARNED.add(site)
        warnings.warn(f"lrcompile: attention site {site} has an estimated output error of {error:.3g} against "
                      f"exact attention, above Policy(max_error={max_error:g}); returning the low-rank result "
                      f"(on_inaccurate='warn'; warned once per site)", stacklevel=2)
    return fall_back


# The guard as ops of its own, for the kernels that leave it to the caller (the Triton op, see
# lrcompile.kernels.selector): `lrcompile::factored_attention` runs `check` inside. Like it, they read data,
# so under torch.compile they stay opaque calls, and the backward is an op too, since whether it
# differentiates exact attention is known only at run time.


@torch.library.custom_op("lrcompile::guarded_output", mutates_args=())
def guarded_output(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    scale: float, causal: bool, max_error: float, on_inaccurate: str, site: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, or exact attention where `check` says so (B, H, G, n_q, d_v); exact ()), as factored_attention guards."""
    exact = check(site, out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate)
    # contiguous whatever the inputs' strides, as the fake kernel promises (Inductor asserts them)
    result = exact_attention(q, k, v, key_weight, scale, causal) if exact else out
    return result.clone(memory_format=torch.contiguous_format), torch.tensor(exact, device=q.device)


@guarded_output.register_fake
def _(out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate, site):
    return out.new_empty(out.shape), q.new_empty((), dtype=torch.bool)


@torch.library.custom_op("lrcompile::guarded_output_backward", mutates_args=())
def guarded_output_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    exact: torch.Tensor, scale: float, causal: bool, key_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d out, dq, dk, dv, d key_weight): the gradient goes to `out`, or to exact attention's inputs
    where the forward returned exact attention. d key_weight is empty unless key_weight_grad."""
    # Every result contiguous, whatever the inputs' strides (GQA's grouped q is a view of a transposed
    # projection), as the fake kernel promises: zeros_like and clone would keep the inputs' strides.
    contiguous = torch.contiguous_format
    if exact.item():
        dq, dk, dv, dw = exact_attention_backward(grad, q, k, v, key_weight, scale, causal, key_weight_grad)
        dw = dw.contiguous() if key_weight_grad else q.new_empty(0)
        return grad.new_zeros(grad.shape), dq.contiguous(), dk.contiguous(), dv.contiguous(), dw
    dw = key_weight.new_zeros(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return grad.clone(memory_format=contiguous), q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), dw


@guarded_output_backward.register_fake
def _(grad, q, k, v, key_weight, exact, scale, causal, key_weight_grad):
    dw = key_weight.new_empty(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return grad.new_empty(grad.shape), q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw


def _guard_setup_context(ctx, inputs, output):
    _out, q, k, v, key_weight, scale, causal, *_settings = inputs
    ctx.save_for_backward(q, k, v, key_weight, output[1])
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(output[1])


def _guard_backward(ctx, grad, _grad_exact):
    q, k, v, key_weight, exact = ctx.saved_tensors
    key_weight_grad = key_weight is not None and ctx.needs_input_grad[4]
    d_out, dq, dk, dv, dw = torch.ops.lrcompile.guarded_output_backward(
        grad, q, k, v, key_weight, exact, ctx.scale, ctx.causal, key_weight_grad)
    return d_out, dq, dk, dv, (dw if key_weight_grad else None), None, None, None, None, None


guarded_output.register_autograd(_guard_backward, setup_context=_guard_setup_context)


@torch.no_grad()
def estimate_error(out, q, k, v, key_weight, scale, causal) -> float:
    """The guard's estimate: `relative_error` on the sampled rows (see the module docstring)."""
    rows = sampled_rows(q, SAMPLED_ROWS)  # (B, H, G, m)
    q_rows = q.gather(3, rows.unsqueeze(-1).expand(*rows.shape, q.shape[-1]))
    out_rows = out.gather(3, rows.unsqueeze(-1).expand(*rows.shape, out.shape[-1]))
    exact = exact_attention(q_rows, k, v, key_weight, scale, causal, positions=rows)
    return relative_error(out_rows, exact, v)


def relative_error(out, exact, v) -> float:
    """max over rows and heads of max_c |out - exact| / max_jc |v_jc| of the row's head."""
    if out.numel() == 0:
        return 0.0
    v_scale = v.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(v.dtype).tiny)  # (B, H)
    deviation = (out - exact).abs().amax(dim=(-2, -1))  # (B, H, G)
    return float((deviation / v_scale.unsqueeze(-1)).amax())


def sampled_rows(q, count: int) -> torch.Tensor:
    """Row indices (B, H, G, m): the count // 2 rows of largest |q| per head, then rows spread
    evenly. All rows when there are no more than `count`. Deterministic: no random state used."""
    n_q = q.shape[-2]
    if n_q <= count:
        return torch.arange(n_q, device=q.device).expand(*q.shape[:-2], n_q)
    widest = q.norm(dim=-1).topk(count // 2, dim=-1).indices
    spread = torch.linspace(0, n_q - 1, count - count // 2, device=q.device).round().long()
    return torch.cat([widest, spread.expand(*q.shape[:-2], -1)], dim=-1)


def exact_attention(q, k, v, key_weight, scale, causal, positions=None):
    """softmax(s q k^T + log w) v in the kernel layout; a row with no key of positive weight is 0.

    q (B, H, G, m, d) holds query positions `positions` (B, H, G, m) if given (a few sampled rows:
    computed by explicit products), else 0..m-1 (every row: SDPA, chunk by chunk of queries).
    The causal mask is aligned top-left, as in SDPA.
    """
    keys, values = k.unsqueeze(2), v.unsqueeze(2)  # shared by the G query heads of a key head
    log_weight = _log_weight(key_weight)
    if positions is not None:
        return _weights(q, k, log_weight, _visible(positions, k) if causal else None, scale) @ values
    if not causal and key_weight is None:
        return F.scaled_dot_product_attention(q, keys, values, scale=scale)
    outputs = []
    for start, stop in _spans(q.shape[-2]):
        mask = log_weight
        if causal:
            visible = _visible(torch.arange(start, stop, device=q.device), k)
            mask = visible if mask is None else mask.masked_fill(~visible, -math.inf)
        outputs.append(F.scaled_dot_product_attention(q[..., start:stop, :], keys, values, attn_mask=mask, scale=scale))
    return torch.cat(outputs, dim=-2)


def exact_attention_backward(grad_out, q, k, v, key_weight, scale, causal, key_weight_grad: bool):
    """Gradients (dq, dk, dv, dw or None) of `exact_attention`, chunk by chunk of queries.

    With P = softmax(X), X = s q k^T + log w (+ causal mask), out = P v and g = dL/dout:
        dv = P^T g,   dX = P * (g v^T - rowsum(g * out)),   dq = s dX k,   dk = s dX^T q,
        dw_j = sum_i dX_ij / w_j  (zero where w_j = 0: those keys carry no weight to move).
    Memory: one (C, n_k) block of P per head at a time.
    """
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    d_log_weight = torch.zeros(k.shape[:-1], dtype=q.dtype, device=q.device) if key_weight_grad else None
    log_weight = _log_weight(key_weight)
    for start, stop in _spans(q.shape[-2]):
        q_c, g_c = q[..., start:stop, :], grad_out[..., start:stop, :]
        visible = _visible(torch.arange(start, stop, device=q.device), k) if causal else None
        weights = _weights(q_c, k, log_weight, visible, scale)  # (B, H, G, C, n_k)
        out_c = weights @ v.unsqueeze(2)
        d_scores = weights * (g_c @ v.unsqueeze(2).mT - (g_c * out_c).sum(-1, keepdim=True))
        dq[..., start:stop, :] = scale * (d_scores @ k.unsqueeze(2))
        dk += scale * (d_scores.mT @ q_c).sum(2)
        dv += (weights.mT @ g_c).sum(2)
        if d_log_weight is not None:
            d_log_weight += d_scores.sum(dim=(2, 3))
    dw = None
    if key_weight_grad:
        dw = torch.where(key_weight > 0, d_log_weight / torch.where(key_weight > 0, key_weight, 1.0), 0.0)
    return dq, dk, dv, dw


def _weights(q, k, log_weight, visible, scale):
    """softmax(s q k^T + log w), causally masked where `visible` is False: (B, H, G, m, n_k).
    A fully masked row is 0, not NaN."""
    scores = scale * (q @ k.unsqueeze(2).mT)
    if log_weight is not None:
        scores += log_weight
    if visible is not None:
        scores.masked_fill_(~visible, -math.inf)
    return torch.softmax(scores, dim=-1).nan_to_num_(0.0)


def _log_weight(key_weight):
    """log w as (B, H, 1, 1, n_k), -inf where w = 0; None without key weights. The log is taken
    of 1 where w = 0, so that no gradient ever meets log 0."""
    if key_weight is None:
        return None
    attends = key_weight > 0
    log_weight = torch.log(torch.where(attends, key_weight, 1.0)).masked_fill(~attends, -math.inf)
    return log_weight[:, :, None, None, :]


def _visible(positions, k):
    """(..., m, n_k): True where query position >= key position (SDPA's top-left causal mask)."""
    return positions.unsqueeze(-1) >= torch.arange(k.shape[-2], device=k.device)


def _spans(rows):
    for start in range(0, rows, EXACT_QUERY_CHUNK):
        yield start, min(start + EXACT_QUERY_CHUNK, rows)
