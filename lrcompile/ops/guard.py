"""The run-time accuracy guard (docs/design.md §3, "approximate softmax"): every call checks itself.

A polynomial of low degree is accurate only while the scores stay in a narrow range, and trained
models leave that range (docs/design.md §3). So each call of a guarded site
estimates its own output error against exact softmax attention, and acts on it. The metric is the
error of the attention output relative to its own scale, per query head (b, h):

    error = max over sampled rows i of  ||out_i - exact_i||_2 / rms_j ||out_j||_2

where rms_j runs over *every* row of the head's output (so the estimate on a subset of rows never
exceeds the same metric on all rows), floored at 1e-6 of the largest exact row; max over heads.
max_error = 0.01 thus means: no row is off by more than about 1% of a typical output row.

The sampled rows are chosen by a cheap per-row bound, so the worst rows are among them: the
score range each row sees, ||q_i|| times the largest ||k_j|| over the keys it sees (a running
max when causal), and that range divided by sqrt(number of keys it sees) (few keys average
fewer errors away: the early causal rows), a third each, and a third spread evenly (non-causal,
where every row sees the same keys, the bound ranks rows by ||q_i||: two thirds by it). Their
exact attention costs O(m n d) for m = SAMPLED_ROWS rows, against the O(n r d) of the factored call.

The backward checks itself too (`check_backward`): for the first BACKWARD_ROWS of the same
rankings, their exact gradient contributions (dq_i, and the parts of dk, dv that row i sends)
against the polynomial's, each as a relative Frobenius error per head; a call above max_error
differentiates exact attention instead and counts as a backward fallback. Fewer rows than the
forward's: the check costs several m x n passes, and the overhead must stay at a few percent of
the factored forward+backward (benchmarks/guard_overhead.py).

If an estimate exceeds `max_error` (a NaN or inf estimate counts as exceeding it),
`on_inaccurate` says what happens: "exact" computes the call exactly (and its backward follows),
"warn" warns once per site, "error" raises, "allow" never checks (the polynomial is the model).
One case is never computed by the polynomial: causal attention whose per-key bias leaves some row
only keys of weight below e^-WEIGHT_RANGE against the global peak (ALiBi over long sequences): the
factored sweep shares one peak across rows, and those rows' weights underflow. Such calls return
exact attention under every setting (counted as a fallback with error inf; warned once per site
unless "exact").

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
SAMPLED_ROWS = 33  # a third each: widest range, widest range per sqrt(keys seen), spread evenly
BACKWARD_ROWS = 12  # the backward's rows: the first of the same three rankings (its check costs more per row)
EXACT_QUERY_CHUNK = 1024  # query rows per exact SDPA call, so a causal mask never spans n x n


class InaccurateAttentionError(RuntimeError):
    """Raised under Policy(on_inaccurate="error") by a call whose estimated error exceeds max_error."""


@dataclass
class SiteStats:
    """What the guard saw at one site since the last `reset_stats()`."""

    calls: int = 0
    fallbacks: int = 0          # calls that returned exact attention
    largest_error: float = 0.0  # largest estimated error of a checked call (0.0 if none was checked;
                                # inf if an estimate was NaN or inf)
    backward_fallbacks: int = 0  # backward calls whose gradient estimate exceeded max_error: exact there
    largest_backward_error: float = 0.0  # largest estimated gradient error of a checked backward
    compile_failures: int = 0   # compiles of a graph with this site rewritten that failed, so it ran exact
    compile_error: str = ""     # the last such failure, as "ErrorType: message"

    def record(self, error: float | None, fell_back: bool):
        self.calls += 1
        self.fallbacks += int(fell_back)
        if error is not None:
            self.largest_error = max(self.largest_error, _finite_or_inf(error))

    def record_backward(self, error: float, fell_back: bool):
        self.backward_fallbacks += int(fell_back)
        self.largest_backward_error = max(self.largest_backward_error, _finite_or_inf(error))


def _finite_or_inf(error: float) -> float:
    return error if math.isfinite(error) else math.inf


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


def check(site, out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate, log_weight=None) -> bool:
    """Estimate the error of `out` (B, H, G, n_q, d_v), record it, act by `on_inaccurate`.

    `log_weight` (B, H, n_k): the float mask's log key weights (m_j - peak) where the caller has
    them; exact attention then uses them, so that keys whose weight e^{m_j - peak} underflows keep
    their true weight (see `weights_underflow`). Returns True when the caller must return exact
    attention instead of `out`.
    """
    underflow = weights_underflow(log_weight, causal)
    if on_inaccurate == "allow" and not _MEASURING and not underflow:
        _STATS.setdefault(site, SiteStats()).record(None, False)
        return False
    error = math.inf if underflow else estimate_error(out, q, k, v, key_weight, scale, causal, log_weight)
    inaccurate = not error <= max_error  # NaN counts as inaccurate
    if _MEASURING:
        exact = exact_attention(q, k, v, key_weight, scale, causal, log_weight=log_weight)
        every_row = torch.arange(q.shape[-2], device=q.device).expand(q.shape[:-1])
        exact = _caller_defines_unweighted_rows(out, exact, every_row, key_weight, causal)
        _MEASURING[-1][site] = Measurement(_finite_or_inf(relative_error(out, exact, v)), _finite_or_inf(error),
                                           inaccurate)
        return False
    fall_back = underflow or (inaccurate and on_inaccurate == "exact")
    _STATS.setdefault(site, SiteStats()).record(error, fall_back)
    if inaccurate and on_inaccurate == "error":
        raise InaccurateAttentionError(
            f"lrcompile: attention site {site} has an estimated output error of {error:.3g} against exact "
            f"attention, above Policy(max_error={max_error:g}); raise max_error, use a higher degree, or set "
            f"on_inaccurate to 'exact' (fall back) or 'allow' (train with the polynomial)"
            + (f" ({UNDERFLOW_REASON})" if underflow else ""))
    if underflow and on_inaccurate != "exact" and site not in _WARNED:
        _WARNED.add(site)
        warnings.warn(f"lrcompile: attention site {site}: {UNDERFLOW_REASON}; returning exact attention "
                      f"(warned once per site)", stacklevel=2)
    elif inaccurate and on_inaccurate == "warn" and site not in _WARNED:
        _WARNED.add(site)
        warnings.warn(f"lrcompile: attention site {site} has an estimated output error of {error:.3g} against "
                      f"exact attention, above Policy(max_error={max_error:g}); returning the low-rank result "
                      f"(on_inaccurate='warn'; warned once per site)", stacklevel=2)
    return fall_back


# How far below its row's peak a key weight e^{m_j - peak} may sit before the factored causal sweep
# (one peak shared by every row) loses a row whose every visible key is that far down: it must
# stay far above the smallest normal number once multiplied by features and values.
WEIGHT_RANGE = {torch.float16: 4.0, torch.bfloat16: 30.0, torch.float32: 40.0, torch.float64: 600.0}
# A log weight at or below this removes the key (padding: -1e4, -1e9, finfo.min), as in passes.masks.
REMOVED_BELOW = -1e4
UNDERFLOW_REASON = ("causal attention with a per-key bias (ALiBi?) whose range leaves early rows only keys of "
                    "underflowing weight in the factored sweep, which shares one peak across rows")


def weights_underflow(log_weight, causal) -> bool:
    """True where some causal row's visible keys all sit more than WEIGHT_RANGE below the global
    peak (log_weight = m - peak <= 0, (B, H, n_k)) without being removed (padding): the factored
    sweep would weight them e^{m_j - peak} ~ 0 and lose that row. Non-causal rows all see the peak."""
    if log_weight is None or not causal or log_weight.shape[-1] == 0:
        return False
    reach = log_weight.detach().cummax(-1).values  # (B, H, n_k): the peak row j sees, keys 0..j
    limit = WEIGHT_RANGE.get(log_weight.dtype, 40.0)
    return bool(((reach < -limit) & (reach > REMOVED_BELOW)).any())


def check_backward(site, grad_out, q, k, v, key_weight, coefficients, scale, causal, max_error,
                   on_inaccurate) -> bool:
    """Estimate the gradient error of a call that returned the polynomial's output, record it, act
    by `on_inaccurate`. Returns True when the backward must differentiate exact attention."""
    if on_inaccurate == "allow" or _MEASURING:
        return False
    error = estimate_gradient_error(grad_out, q, k, v, key_weight, coefficients, scale, causal)
    inaccurate = not error <= max_error
    fall_back = inaccurate and on_inaccurate == "exact"
    _STATS.setdefault(site, SiteStats()).record_backward(error, fall_back)
    if inaccurate and on_inaccurate == "error":
        raise InaccurateAttentionError(
            f"lrcompile: attention site {site} has an estimated gradient error of {error:.3g} against exact "
            f"attention, above Policy(max_error={max_error:g}); raise max_error, use a higher degree, or set "
            f"on_inaccurate to 'exact' (fall back) or 'allow' (train with the polynomial)")
    if inaccurate and on_inaccurate == "warn" and (site, "backward") not in _WARNED:
        _WARNED.add((site, "backward"))
        warnings.warn(f"lrcompile: attention site {site} has an estimated gradient error of {error:.3g} against "
                      f"exact attention, above Policy(max_error={max_error:g}); returning the low-rank gradients "
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
    coefficients: list[float] | None = None, log_key_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, or exact attention where `check` says so (B, H, G, n_q, d_v); exact ()), as factored_attention
    guards. With the polynomial's `coefficients`, the backward checks its gradients too (check_backward);
    `log_key_weight` as factored_attention takes it (a causal float mask's log weights)."""
    exact = check(site, out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate, log_key_weight)
    # contiguous whatever the inputs' strides, as the fake kernel promises (Inductor asserts them)
    result = exact_attention(q, k, v, key_weight, scale, causal, log_weight=log_key_weight) if exact else out
    return result.clone(memory_format=torch.contiguous_format), torch.tensor(exact, device=q.device)


@guarded_output.register_fake
def _(out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate, site, coefficients=None,
      log_key_weight=None):
    return out.new_empty(out.shape), q.new_empty((), dtype=torch.bool)


@torch.library.custom_op("lrcompile::guarded_output_backward", mutates_args=())
def guarded_output_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
    exact: torch.Tensor, scale: float, causal: bool, key_weight_grad: bool,
    coefficients: list[float] | None = None, max_error: float = 0.0, on_inaccurate: str = "allow", site: str = "",
    log_key_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d out, dq, dk, dv, d key_weight): the gradient goes to `out`, or to exact attention's inputs
    where the forward returned exact attention or the gradient check fails (given `coefficients`).
    d key_weight is empty unless key_weight_grad; it is d log_key_weight where that is given."""
    # Every result contiguous, whatever the inputs' strides (GQA's grouped q is a view of a transposed
    # projection), as the fake kernel promises: zeros_like and clone would keep the inputs' strides.
    contiguous = torch.contiguous_format
    if exact.item() or (coefficients is not None and check_backward(
            site, grad, q, k, v, key_weight, coefficients, scale, causal, max_error, on_inaccurate)):
        dq, dk, dv, dw = exact_attention_backward(grad, q, k, v, key_weight, scale, causal, key_weight_grad,
                                                  log_weight=log_key_weight)
        dw = dw.contiguous() if key_weight_grad else q.new_empty(0)
        return grad.new_zeros(grad.shape), dq.contiguous(), dk.contiguous(), dv.contiguous(), dw
    dw = key_weight.new_zeros(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return grad.clone(memory_format=contiguous), q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), dw


@guarded_output_backward.register_fake
def _(grad, q, k, v, key_weight, exact, scale, causal, key_weight_grad, coefficients=None, max_error=0.0,
      on_inaccurate="allow", site="", log_key_weight=None):
    dw = key_weight.new_empty(key_weight.shape) if key_weight_grad else q.new_empty(0)
    return grad.new_empty(grad.shape), q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dw


def _guard_setup_context(ctx, inputs, output):
    _out, q, k, v, key_weight, scale, causal, max_error, on_inaccurate, site, *rest = inputs
    log_key_weight = rest[1] if len(rest) > 1 else None
    ctx.save_for_backward(q, k, v, key_weight, output[1], log_key_weight)
    ctx.scale, ctx.causal = scale, causal
    ctx.settings = (rest[0] if rest else None, max_error, on_inaccurate, site)
    ctx.mark_non_differentiable(output[1])


def _guard_backward(ctx, grad, _grad_exact):
    q, k, v, key_weight, exact, log_key_weight = ctx.saved_tensors
    # A float mask's exact gradient flows through log_key_weight where that is given (as in factored_attention)
    through_log = log_key_weight is not None
    key_weight_grad = key_weight is not None and ctx.needs_input_grad[11 if through_log else 4]
    d_out, dq, dk, dv, dw = torch.ops.lrcompile.guarded_output_backward(
        grad, q, k, v, key_weight, exact, ctx.scale, ctx.causal, key_weight_grad, *ctx.settings, log_key_weight)
    dw = dw if key_weight_grad else None
    return (d_out, dq, dk, dv, None if through_log else dw, None, None, None, None, None, None,
            dw if through_log else None)


guarded_output.register_autograd(_guard_backward, setup_context=_guard_setup_context)


@torch.no_grad()
def estimate_error(out, q, k, v, key_weight, scale, causal, log_weight=None) -> float:
    """The guard's estimate: `relative_error` on the sampled rows (see the module docstring)."""
    rows = sampled_rows(q, SAMPLED_ROWS, k, key_weight, causal)  # (B, H, G, m)
    q_rows, out_rows = _gather_rows(q, rows), _gather_rows(out, rows)
    exact = exact_attention(q_rows, k, v, key_weight, scale, causal, positions=rows, log_weight=log_weight)
    exact = _caller_defines_unweighted_rows(out_rows, exact, rows, key_weight, causal)
    return relative_error(out_rows, exact, v, scale_of=out)


def _caller_defines_unweighted_rows(out_rows, exact, rows, key_weight, causal):
    """`exact` with the rows that see no key of positive weight taken from `out_rows`: not the polynomial's.

    Such a row (a left-padded causal row under a finite additive mask: every key it sees has
    e^{m_j - peak} = 0) has a zero denominator in every kernel, which returns 0 there, and
    lowrank_attention then gives it the plain average of its visible keys' values, as softmax does
    when x + m rounds x away (ops.attention). Exact attention with the true log weights averages
    them too, so the guard measuring the kernel's 0 against it would send every left-padded batch
    to exact attention. Rows whose keys sit between e^-WEIGHT_RANGE and removal are not these:
    `weights_underflow` returns exact attention for them. (The backward's estimate already agrees
    on such rows: 0 in both.)"""
    if key_weight is None or key_weight.shape[-1] == 0:
        return exact
    positive = (key_weight > 0).to(torch.int32)  # (B, H, n_k)
    if causal:
        seen = positive.cumsum(-1).unsqueeze(2).expand(*rows.shape[:-1], -1)  # (B, H, G, n_k): keys 0..j
        weighted = seen.gather(-1, rows.clamp_max(key_weight.shape[-1] - 1)) > 0  # query i sees keys 0..i
    else:
        weighted = (positive.sum(-1) > 0)[:, :, None, None].expand(rows.shape)
    return torch.where(weighted.unsqueeze(-1), exact, out_rows.to(exact.dtype))


def relative_error(out, exact, v, scale_of=None) -> float:
    """max over heads and rows of ||out_i - exact_i|| / rms_j ||o_j||, o = `scale_of` (default `out`):
    every row of the head's output, so that a subset of rows is measured against the whole output's
    scale. The scale is floored at 1e-6 of the largest exact row: an all-zero output is not a scale.
    (`v` is accepted for the callers' symmetry; the metric does not read it.)"""
    if out.numel() == 0:
        return 0.0
    scale_of = out if scale_of is None else scale_of
    # norms as reductions: no n x d intermediate (a fresh tensor that size costs as much as the check)
    row_scale = scale_of.detach().norm(dim=-1).square().mean(-1).sqrt()  # (B, H, G)
    floor = 1e-6 * exact.detach().norm(dim=-1).amax(-1)  # (B, H, G)
    row_scale = torch.maximum(row_scale, floor).clamp_min(torch.finfo(exact.dtype).tiny)
    deviation = (out - exact).detach().norm(dim=-1).amax(-1)  # (B, H, G)
    return float((deviation / row_scale).amax())


def sampled_rows(q, count: int, k=None, key_weight=None, causal: bool = False) -> torch.Tensor:
    """Row indices (B, H, G, m), chosen by a cheap per-row bound on how wrong a row can be.

    Without `k`: the count // 2 rows of largest |q|, then rows spread evenly. With `k`: a third the
    rows of widest score range ||q_i|| max_{j seen} ||k_j|| (running max when causal), a third the
    rows of widest range per sqrt(keys seen) (few keys: the early causal rows), a third spread
    evenly. All rows when there are no more than `count`. Deterministic: no random state used."""
    n_q = q.shape[-2]
    if n_q <= count:
        return torch.arange(n_q, device=q.device).expand(*q.shape[:-2], n_q)
    q_norm = q.detach().norm(dim=-1)  # (B, H, G, n_q)
    if k is None:
        widest = q_norm.topk(count // 2, dim=-1).indices
        spread = torch.linspace(0, n_q - 1, count - count // 2, device=q.device).round().long()
        return torch.cat([widest, spread.expand(*q.shape[:-2], -1)], dim=-1)
    third = count // 3
    if not causal:  # every row sees the same keys: the bound ranks rows as ||q_i|| does; more of them
        picks = [q_norm.topk(2 * third, dim=-1).indices]
    else:
        reach, seen = _row_reach(q, k, key_weight, causal)  # (B, H, n_q) each
        bound = q_norm * reach.unsqueeze(2)
        picks = [bound.topk(third, dim=-1).indices,
                 (bound / seen.clamp_min(1).sqrt().unsqueeze(2)).topk(third, dim=-1).indices]
    spread = torch.linspace(0, n_q - 1, count - 2 * third, device=q.device).round().long()
    return torch.cat(picks + [spread.expand(*q.shape[:-2], -1)], dim=-1)


def _row_reach(q, k, key_weight, causal):
    """(largest ||k_j - mu|| over the keys row i sees, how many keys it sees), (B, H, n_q) when causal
    (mu = 0), (B, H, 1) otherwise (mu the mean of the valid keys, as the op centres them). Read
    passes over k only: ||k_j - mu||^2 = ||k_j||^2 - 2 k_j . mu + ||mu||^2."""
    valid = None if key_weight is None else (key_weight > 0)
    keys = k.detach()
    squared = keys.norm(dim=-1).square()  # (B, H, n_k)
    if not causal:
        mu = _key_mean(keys, key_weight)  # (B, H, 1, d)
        squared = squared - 2 * (keys @ mu.mT)[..., 0] + mu.square().sum(-1)
    norms = squared.clamp_min(0).sqrt()
    counts = torch.ones_like(norms)
    if valid is not None:
        norms, counts = norms * valid, valid.to(norms.dtype)
    if not causal:
        return norms.amax(-1, keepdim=True), counts.sum(-1, keepdim=True)
    last_key = torch.arange(q.shape[-2], device=q.device).clamp_max(k.shape[-2] - 1)  # query i sees keys 0..i
    return norms.cummax(-1).values[..., last_key], counts.cumsum(-1)[..., last_key]


def _key_mean(k, key_weight):
    """The mean of the valid keys (w_j > 0), (B, H, 1, d): the op's centre mu, before the sqrt(s)."""
    if key_weight is None:
        return k.mean(-2, keepdim=True)
    valid = (key_weight > 0).to(k.dtype).unsqueeze(-2)  # (B, H, 1, n_k)
    return (valid @ k) / valid.sum(-1, keepdim=True).clamp_min(1)


def _gather_rows(x, rows):
    return x.gather(3, rows.unsqueeze(-1).expand(*rows.shape, x.shape[-1]))


@torch.no_grad()
def estimate_gradient_error(grad_out, q, k, v, key_weight, coefficients, scale, causal) -> float:
    """The backward's estimate: for the sampled rows S, the polynomial's gradient contributions
    (dq_i for i in S, and what rows S send to dk and dv) against exact attention's, each as
    ||approx - exact||_F / ||exact||_F per head (floored at 1e-6 of the largest); the largest.

    With q' = sqrt(s) q, k' = sqrt(s) k - mu (the op's centring), x = q' k'^T, g = dO on rows S:
        polynomial  a_ij = w_j P(x_ij), p^_ij = a_ij / D_i,  dX^_ij = w_j P'(x_ij) (g_i.v_j - g_i.o^_i) / D_i
        exact       p_ij = softmax_j(x_ij + log w_j),      dX_ij = p_ij (g_i.v_j - g_i.o_i)
    (softmax ignores the row constant q'.mu). Both give dq = sqrt(s) dX k' (exact rows of dX sum to
    0), dv = p^T g, dk = sqrt(s) C dX^T q', C the centring over valid keys (the identity when
    causal; exact attention's dk is centred already). The n x d contributions are never formed:
    ||A^T B||_F^2 = sum((A A^T) * (B B^T)) over the m x m Gram matrices, and C subtracts
    n_valid ||mean||^2. Cost O(m n_k d) for m = SAMPLED_ROWS rows, in a few passes over m x n_k.
    """
    rows = sampled_rows(q, BACKWARD_ROWS, k, key_weight, causal)  # (B, H, G, m)
    root = math.sqrt(scale)
    q_rows = root * _gather_rows(q, rows).flatten(2, 3)  # q' (B, H, G m, d)
    g_rows = _gather_rows(grad_out, rows).flatten(2, 3)  # (B, H, G m, d_v)
    # k' = sqrt(s) (k - mean): x = sqrt(s) q' k^T - q'.mu', never forming k' (an n x d pass)
    mu = None if causal else root * _key_mean(k, key_weight)  # (B, H, 1, d)
    x = root * (q_rows @ k.mT)  # (B, H, G m, n_k)
    if mu is not None:
        x -= q_rows @ mu.mT
    keep = None if key_weight is None else (key_weight > 0)[:, :, None, :]
    if causal:
        visible = _visible(rows.flatten(2, 3), k)  # (B, H, G m, n_k)
        keep = visible if keep is None else keep & visible

    logits = x if keep is None else x.masked_fill(~keep, -math.inf)
    if key_weight is not None:
        logits = logits + _log_weight(key_weight)[:, :, 0]
    p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    g_dot_v = g_rows @ v.mT  # (B, H, G m, n_k); g.o = sum_j p_ij g.v_j, no product with v needed
    d_exact = (g_dot_v - (p * g_dot_v).sum(-1, keepdim=True)).mul_(p)

    a = _horner(coefficients, x)
    slope = _horner([m * c for m, c in enumerate(coefficients)][1:] or [0.0], x)
    for factor in ((key_weight[:, :, None, :],) if key_weight is not None else ()) + ((keep,) if keep is not None else ()):
        a.mul_(factor)
        slope.mul_(factor)
    denominator = a.sum(-1, keepdim=True)
    safe = denominator.masked_fill(denominator == 0, 1.0)
    p_hat = a.div_(safe)
    d_approx = slope.mul_(g_dot_v.sub_((p_hat * g_dot_v).sum(-1, keepdim=True))).div_(safe)

    difference = d_approx.sub_(d_exact)  # (B, H, G m, n_k)
    dq = (_squared(_times_centred_keys(difference, k, mu, root)), _squared(_times_centred_keys(d_exact, k, mu, root)))
    q_gram = q_rows @ q_rows.mT  # (B, H, G m, G m)
    dk_difference = _gram_norm(difference, q_gram)
    if not causal:  # the centring C: minus n_valid ||mean over valid keys||^2
        mean = (difference.sum(-1, keepdim=True) * q_rows).sum(-2)  # (B, H, d): n_valid times the mean
        count = float(k.shape[-2]) if key_weight is None else (key_weight > 0).sum(-1).clamp_min(1).to(mean.dtype)
        dk_difference = dk_difference - mean.square().sum(-1) / count
    dk = (dk_difference, _gram_norm(d_exact, q_gram))
    g_gram = g_rows @ g_rows.mT
    dv = (_gram_norm(p_hat.sub_(p), g_gram), _gram_norm(p, g_gram))

    worst = 0.0
    for deviation, size in (dq, dk, dv):
        deviation, size = deviation.clamp_min(0).sqrt(), size.clamp_min(0).sqrt()  # (B, H)
        floor = 1e-6 * size.amax().clamp_min(torch.finfo(size.dtype).tiny)
        error = float((deviation / torch.maximum(size, floor)).amax())
        if math.isnan(error):
            return math.inf
        worst = max(worst, error)
    return worst


def _times_centred_keys(d_scores, k, mu, root):
    """d_scores @ k' for k' = sqrt(s) k - mu' (mu' None: not centred), as sqrt(s) d_scores k - rowsum mu'."""
    product = root * (d_scores @ k)
    return product if mu is None else product - d_scores.sum(-1, keepdim=True) * mu


def _squared(x):
    """Squared Frobenius norm over the last two axes: (B, H)."""
    return x.square().sum((-2, -1))


def _gram_norm(a, gram):
    """||a^T b||_F^2 = sum((a a^T) * (b b^T)) for a (B, H, m, n), gram = b b^T (B, H, m, m): (B, H)."""
    return ((a @ a.mT) * gram).sum((-2, -1))


def _horner(coefficients, x):
    result = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result.mul_(x).add_(c)
    return result


def exact_attention(q, k, v, key_weight, scale, causal, positions=None, log_weight=None):
    """softmax(s q k^T + log w) v in the kernel layout; a row with no key of positive weight is 0.

    q (B, H, G, m, d) holds query positions `positions` (B, H, G, m) if given (a few sampled rows:
    computed by explicit products), else 0..m-1 (every row: SDPA, chunk by chunk of queries).
    The causal mask is aligned top-left, as in SDPA. `log_weight` (B, H, n_k), where given, is
    log w itself (a float mask m - peak), which keeps keys whose weight e^{m - peak} underflows.
    """
    keys, values = k.unsqueeze(2), v.unsqueeze(2)  # shared by the G query heads of a key head
    log_weight = _log_weight(key_weight) if log_weight is None else log_weight[:, :, None, None, :].to(q.dtype)
    if positions is not None:
        return _weights(q, k, log_weight, _visible(positions, k) if causal else None, scale) @ values
    if not causal and log_weight is None:
        return F.scaled_dot_product_attention(q, keys, values, scale=scale)
    outputs = []
    for start, stop in _spans(q.shape[-2]):
        mask = log_weight
        if causal:
            visible = _visible(torch.arange(start, stop, device=q.device), k)
            mask = visible if mask is None else mask.masked_fill(~visible, -math.inf)
        outputs.append(F.scaled_dot_product_attention(q[..., start:stop, :], keys, values, attn_mask=mask, scale=scale))
    return torch.cat(outputs, dim=-2)


def exact_attention_backward(grad_out, q, k, v, key_weight, scale, causal, key_weight_grad: bool, log_weight=None):
    """Gradients (dq, dk, dv, dw or None) of `exact_attention`, chunk by chunk of queries. With
    `log_weight` given (see `exact_attention`), the last is the gradient of log_weight instead.

    With P = softmax(X), X = s q k^T + log w (+ causal mask), out = P v and g = dL/dout:
        dv = P^T g,   dX = P * (g v^T - rowsum(g * out)),   dq = s dX k,   dk = s dX^T q,
        dw_j = sum_i dX_ij / w_j  (zero where w_j = 0: those keys carry no weight to move).
    Memory: one (C, n_k) block of P per head at a time.
    """
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    d_log_weight = torch.zeros(k.shape[:-1], dtype=q.dtype, device=q.device) if key_weight_grad else None
    given_log_weight = log_weight is not None
    log_weight = _log_weight(key_weight) if log_weight is None else log_weight[:, :, None, None, :].to(q.dtype)
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
    if key_weight_grad and given_log_weight:
        dw = d_log_weight
    elif key_weight_grad:
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
