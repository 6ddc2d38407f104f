"""`lowrank_attention`: the public op, with the argument semantics of F.scaled_dot_product_attention.

This module owns what a caller sees: argument checking, the layouts SDPA accepts (leading batch
and head axes broadcast against each other, GQA heads), masks turned into key weights, rows with
no key to attend to, dtypes, and the choice of polynomial; it asks `lrcompile.math.memory_budget`
whether the feature states fit, `lrcompile.kernels.selector` which implementation runs the call
(the `KernelConfig` it is handed), and `lrcompile.ops.guard` how accurate a call is. The call goes
on down: to the op `lrcompile::factored_attention` (lrcompile.ops.factored_op) for the C and torch
kernels, or to the Triton kernels' own op, through the kernel interface (lrcompile.kernels.interface).
"""

from __future__ import annotations

import math
import warnings

import torch

from lrcompile.kernels import selector
from lrcompile.kernels.interface import KernelConfig
from lrcompile.kernels.operands import centre_keys
from lrcompile.math.features import feature_dim, is_tracing
from lrcompile.math.memory_budget import check_memory_budget
from lrcompile.ops import guard
from lrcompile.ops.factored_op import factored_attention
from lrcompile.math.polynomial import MAX_DEGREE, ExpPolynomial, exp_polynomial, needs_bound, polynomial_without_bound

SUPPORTED_MASKS = "None, is_causal, or a key-padding mask broadcast over queries (shape (..., 1, n_k))"


def lowrank_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    degree: int = 2,
    approximation: str = "taylor",
    bound: float | None = None,
    chunk_size: int | None = None,
    max_error: float = 0.01,
    on_inaccurate: str = "allow",
    site_label: str = "lowrank_attention",
    memory_budget: int | None = None,
    config: KernelConfig | None = None,
    masked_rows: str = "visible",
) -> torch.Tensor:
    """Softmax attention with exp replaced by a degree-`degree` polynomial, in O(n r d).

    The positional arguments are F.scaled_dot_product_attention's, with its meaning: query
    (..., n_q, d), key (..., n_k, d), value (..., n_k, d_v), their leading axes broadcast against
    each other; with `enable_gqa` the head axis (-3) of key and value is repeated to query's.

    attn_mask: None, or a key-padding mask (constant along the query axis, shape (..., 1, n_k) or
        a query axis whose rows are all equal), boolean (True = attend) or additive float (in
        float32 or query's dtype); combined with `is_causal` as SDPA does (both apply). Masks that
        vary along the query axis raise ValueError. A row with no key to attend to gives zeros,
        as SDPA does; an additive mask whose rows are so negative that the scores no longer
        change `score + mask` in floating point (finfo.min) gives, as in the eager spelling,
        the plain average of the values its finite entries keep: with `is_causal`, the keys the
        row sees (masked_rows="visible", SDPA's -inf above the diagonal), or every key
        (masked_rows="all": a causal mask with a finite fill too, as transformers' eager masks
        have, leaves such a row every key at the same score), with softmax's gradient through
        the rounded-away scores in the second case, as the eager spelling's autograd gives it.
    dropout_p: only 0.0; dropout on the attention weights cannot be factored (ValueError).
    scale: any finite number (zero gives uniform weights); default 1/sqrt(d).
    degree, approximation: the polynomial ("taylor" or "chebyshev", see lrcompile.math.polynomial).
    bound: score range B the polynomial must be accurate and positive on. None: not needed for
        even Taylor degrees (positive everywhere, coefficients independent of B); otherwise
        estimated from the inputs as |s| max|q| max|k - mu| (eager mode only). Non-causal keys
        are centred on their mean (mu), which leaves softmax unchanged and narrows the range;
        causal keys are not (mu = 0), since the mean would leak later keys into earlier outputs.
    chunk_size: rows per chunk (memory/speed trade-off); None picks one.
    max_error, on_inaccurate, site_label: the accuracy guard (lrcompile.ops.guard). Called directly, the op
        computes the polynomial attention it was asked for ("allow"); the backend's rewrites pass
        the policy's "exact" / "warn" / "error", and `site_label` names the counters of lrcompile.stats().
    memory_budget: bytes the feature-sized states may take (see `state_bytes`); None:
        DEFAULT_MEMORY_BUDGET. A call over budget raises MemoryBudgetError before allocating.
    config: a `lrcompile.kernels.interface.KernelConfig` decided beforehand (the backend's rewrites pass the
        policy's); it replaces degree, approximation, bound, chunk_size, max_error, on_inaccurate
        and site_label, which must then be left at their defaults. Without it, one is built here:
        the polynomial as above, the implementation by `lrcompile.kernels.selector.select`.

    Low-precision inputs are computed in float32 and returned in their own dtype.
    """
    q, k, v = query, key, value
    check_tensors(q, k, v, enable_gqa)
    check_flags(dropout_p, is_causal)
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows must be one of {MASKED_ROWS}, got {masked_rows!r}")
    if config is not None:
        check_config_alone(config, degree=degree, approximation=approximation, bound=bound, chunk_size=chunk_size,
                           max_error=max_error, on_inaccurate=on_inaccurate, site_label=site_label)
        degree, chunk_size = config.degree, config.chunk_size
        max_error, on_inaccurate, site_label = config.max_error, config.on_inaccurate, config.site_label
    guard.check_settings(max_error, on_inaccurate)
    check_degree(degree)
    head_dim = q.shape[-1]
    scale = check_scale(scale, head_dim)
    if scale < 0:
        # s q.k = |s| q.(-k): the factored math takes sqrt(|s|) on both sides, the sign on the keys.
        k, scale = -k, -scale
    mask = None if attn_mask is None else key_padding_mask(attn_mask, q, k, v, enable_gqa)
    layout = OperandLayout.of(q, k, v, mask, enable_gqa)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(head_dim, degree, is_causal)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    compute_dtype = selector.compute_dtype(q.dtype)
    if layout.is_empty:
        return _empty_attention(q, k, v, attn_mask, layout)
    check_memory_budget(head_dim, v.shape[-1], degree, layout.batch_heads, min(chunk, layout.rows), compute_dtype,
                        memory_budget)

    q5, k4, v4, mask3 = layout.apply(q, k, v, mask)
    if head_dim == 0:  # no features: every score is 0, which one zero coordinate computes
        q5, k4 = (torch.cat([t, t.new_zeros(t.shape[:-1] + (1,))], -1) for t in (q5, k4))
    q5, k4, v4 = q5.to(compute_dtype), k4.to(compute_dtype), v4.to(compute_dtype)
    key_weight = log_key_weight = None
    if mask3 is not None:
        key_weight, peak = key_weights(mask3, compute_dtype)
        if mask3.is_floating_point() and is_causal:
            # Causal rows see different peaks of the bias: the guard needs log w itself (guard.weights_underflow).
            log_key_weight = mask3.to(compute_dtype) - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        if mask3.is_floating_point():
            absorbed = _scores_absorbed(peak, q5, k4, scale)  # (B, 1)
            q5 = q5.masked_fill(absorbed[:, :, None, None, None], 0.0)
    if config is None:
        polynomial = choose_polynomial(degree, approximation, bound, q5, k4, key_weight, scale, bool(is_causal))
        implementation = selector.select(q5.device, compute_dtype, degree, q5.shape[-1], v4.shape[-1])
        config = KernelConfig(implementation, tuple(polynomial.coefficients), chunk, float(max_error), on_inaccurate,
                              str(site_label))
    else:
        selector.check(config.implementation, q5.device, compute_dtype, degree, q5.shape[-1], v4.shape[-1])

    out, denominator, exact = _factored(config, q5, k4, v4, key_weight, scale, bool(is_causal), log_key_weight)
    if is_causal and mask3 is not None and mask3.is_floating_point() and masked_rows == "all":
        # exact attention (the guard's fallback) averages the visible keys only: these rows, both ways
        out = _rows_averaging_every_key(out, denominator, q5, k4, v4, torch.isfinite(mask3), scale)
    elif is_causal and mask3 is not None and mask3.is_floating_point():
        # exact attention already averages such rows; the kernel's denominator says nothing about them
        out = torch.where(exact, out, _rows_without_weight(out, denominator, v4, torch.isfinite(mask3)))
    return layout.restore(out).to(q.dtype)


def _factored(config: KernelConfig, q, k, v, key_weight, scale: float, causal: bool, log_key_weight=None):
    """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), exact ()) from the op `config.implementation`
    runs on, guarded (lrcompile.ops.guard) either way; exact is True where the guard returned exact attention."""
    coefficients = list(config.coefficients)
    if config.implementation == "triton":
        # the Triton kernels' own op (imports triton only where it runs); the guard composed after it
        out, denominator, _ = selector.kernels_for("triton").forward(q, k, v, key_weight, config, scale, causal)
        out, exact = guard.guarded_output(out, q, k, v, key_weight, scale, causal, config.max_error,
                                          config.on_inaccurate, config.site_label, coefficients, log_key_weight)
        return out, denominator, exact
    out, denominator, _, exact = factored_attention(q, k, v, key_weight, coefficients, scale, causal,
                                                    config.chunk_size, config.max_error, config.on_inaccurate,
                                                    config.site_label, config.implementation, log_key_weight,
                                                    config.algorithm)
    return out, denominator, exact


def check_config_alone(config, **settings):
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a lrcompile.kernels.interface.KernelConfig, got {type(config).__name__}")
    defaults = dict(degree=2, approximation="taylor", bound=None, chunk_size=None, max_error=0.01,
                    on_inaccurate="allow", site_label="lowrank_attention")
    given = [f"{name}={value!r}" for name, value in settings.items() if value != defaults[name]]
    if given:
        raise TypeError(f"config= already holds the polynomial, chunk size and guard settings; got {', '.join(given)} "
                        f"as well: pass one or the other")


def default_chunk_size(head_dim: int, degree: int, causal: bool) -> int:
    """Rows per chunk: about 1 MiB of float32 features per head (r x C), which keeps a chunk's
    feature block and a state in one core's cache; causal chunks are half that, since their
    C x C blocks cost O(n C). Measured best on the 2-core CPU of benchmarks/RESULTS.md
    (d = 64, degree 2: 128 and 64)."""
    r = feature_dim(head_dim, degree)
    budget, largest = (1 << 17, 256) if causal else (1 << 18, 512)
    return max(32, min(largest, 16 * round(budget / r / 16)))


def choose_polynomial(degree, approximation, bound, q, k, key_weight, scale, causal) -> ExpPolynomial:
    """The polynomial the op will use, refusing one that is not positive on the score range."""
    if bound is None and not needs_bound(degree, approximation):
        return polynomial_without_bound(degree, approximation)  # no range measured: no device sync
    given = bound is not None
    if not given:
        if is_tracing(q):
            raise ValueError(
                f"approximation={approximation!r} with degree={degree!r} needs an explicit bound= "
                f"under torch.compile (the score range cannot be measured while tracing); only "
                f"even-degree taylor works without one"
            )
        bound = _finite_score_bound(q, k, key_weight, scale, causal, approximation, degree)
    polynomial = exp_polynomial(degree, bound, approximation)
    # An estimated bound is the measured range already; only a caller's bound can fall short of it.
    if given and needs_bound(degree, approximation) and not is_tracing(q):
        measured = score_bound(q, k, key_weight, scale, causal)
        if measured > polynomial.bound:
            warnings.warn(
                f"the Cauchy-Schwarz estimate of the score range, {measured:.3g}, exceeds bound="
                f"{polynomial.bound:g}, where the {approximation} polynomial of degree {degree} is known "
                f"to be positive and accurate; if scores really go beyond it, weights may be wrong",
                stacklevel=3,
            )
    return polynomial


def _finite_score_bound(q, k, key_weight, scale, causal, approximation, degree) -> float:
    measured = score_bound(q, k, key_weight, scale, causal)
    if not math.isfinite(measured):
        raise ValueError(
            f"query or key holds NaN or inf, so the score range that the {approximation} polynomial of "
            f"degree {degree} needs cannot be measured (an even taylor degree needs none)"
        )
    # Scale 0, or all-zero rows: every score is 0, where any positive range is exact.
    return max(measured, 2.0**-10)


def score_bound(q: torch.Tensor, k: torch.Tensor, key_weight, scale: float, causal: bool) -> float:
    """A rigorous bound B on |s q . (k - mu)| over all queries and valid keys (Cauchy-Schwarz).

    q (B, H, G, n_q, d), k (B, H, n_k, d), scale >= 0 (a negative scale is carried by k)."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    k_centred, valid, _ = centre_keys(k, key_weight, scale, causal)
    key_norms = k_centred.norm(dim=-1)
    if valid is not None:
        key_norms = key_norms * valid.squeeze(-1)
    return float((q.norm(dim=-1).amax() * math.sqrt(scale) * key_norms.amax()).item())


@torch.no_grad()
def measured_score_range(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> float:
    """The largest |score| lowrank_attention would see on these inputs: max |s q_i . (k_j - mu)| over
    the pairs that attend (valid keys; j <= i if causal). Exact, in query chunks: O(n^2 d) work
    but O(n d) memory; meant for a one-time measurement, not the hot path."""
    scale = check_scale(scale, q.shape[-1])
    if scale < 0:
        k, scale = -k, -scale
    mask = None if attn_mask is None else key_padding_mask(attn_mask, q, k, v, enable_gqa)
    layout = OperandLayout.of(q, k, v, mask, enable_gqa)
    if layout.is_empty:
        return 0.0
    q5, k4, _, mask3 = layout.apply(q, k, v, mask)
    key_weight = None if mask3 is None else key_weights(mask3, torch.float32)[0]
    k_centred = centre_keys(k4.float(), key_weight, scale, is_causal)[0]  # (B, H, n_k, d)
    q_scaled = q5.float() * math.sqrt(scale)  # (B, H, G, n_q, d)
    largest = torch.zeros(())
    for start in range(0, q5.shape[-2], 1024):
        scores = (q_scaled[..., start:start + 1024, :] @ k_centred.unsqueeze(2).mT).abs()  # (B, H, G, C, n_k)
        if key_weight is not None:
            scores = scores * (key_weight > 0)[:, :, None, None, :]
        if is_causal:
            rows = torch.arange(start, start + scores.shape[-2])[:, None]
            scores = scores * (rows >= torch.arange(k4.shape[-2]))
        largest = torch.maximum(largest, scores.amax())
    return float(largest)


def key_weights(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A key-padding mask (..., n_k) as multiplicative key weights w >= 0, and the float mask's
    per-row peak (..., 1) (None for a boolean mask).

    Boolean: w = 1 where True (attend). Additive float m: softmax(x + m) weights key j by
    e^{m_j}; shifting m by its maximum keeps w <= 1 and changes nothing after normalisation.
    A row with no finite entry has peak -inf and every weight 0: no key to attend to.
    """
    if mask.dtype == torch.bool:
        return mask.to(dtype), None
    mask = mask.to(dtype)
    peak = mask.amax(-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return torch.exp(mask - shift), peak


def _scores_absorbed(peak: torch.Tensor, q5: torch.Tensor, k4: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H) True where the float mask's peak is so large in magnitude (finfo.min, say) that
    every score x rounds away in x + peak: softmax then sees the mask alone, and the weights are
    e^{m_j - peak} whatever the scores. Zeroing q reproduces exactly that with P(0) = c_0."""
    scores = math.sqrt(scale) * q5.detach().norm(dim=-1).amax((-1, -2))  # (B, H)
    scores = scores * math.sqrt(scale) * k4.detach().norm(dim=-1).amax(-1)
    peak = peak[..., 0]
    return torch.isfinite(peak) & (peak + scores == peak) & (peak - scores == peak)


def _rows_without_weight(out, denominator, v4, finite):
    """Causal rows whose visible keys all have weight e^{m_j - peak} = 0 (a left-padded row under a
    finite additive mask): softmax(x + m) rounds x away there and averages the values of the
    visible keys with finite m; with none, the kernel's zero row stays.

    out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), v4 (B, H, n_k, d_v), finite (B, H, n_k).
    """
    n_q, n_k = out.shape[-2], v4.shape[-2]
    visible = finite.to(v4.dtype)
    sums = torch.cumsum(v4 * visible.unsqueeze(-1), dim=-2)  # (B, H, n_k, d_v): keys 0..j
    counts = torch.cumsum(visible, dim=-1)  # (B, H, n_k)
    last_key = torch.arange(n_q, device=out.device).clamp_max(n_k - 1)  # query i sees keys 0..i
    average = sums[:, :, last_key] / counts[:, :, last_key].clamp_min(1).unsqueeze(-1)  # (B, H, n_q, d_v)
    return torch.where((denominator == 0).unsqueeze(-1), average.unsqueeze(2), out)


def _rows_averaging_every_key(out, denominator, q5, k4, v4, finite, scale):
    """Causal rows whose visible keys all have weight 0, under a mask whose causal part has the same
    finite fill (masked_rows="all"): every key j with a finite m_j sits at the same score there, so
    softmax(x + m) averages all their values, and its gradient is softmax's at those uniform weights,
    dX_ij = (g_i.v_j - g_i.o_i) / c over the c keys, which reaches q and k through scores the forward
    rounded away. Formed as  o_i = v_bar + s q_i (K^T V / c) - s (q_i . k_bar) v_bar  minus the same
    with q and k detached: zero in value, that gradient in the backward, in O(n d d_v) per head.

    out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), q5 (B, H, G, n_q, d), k4 (B, H, n_k, d),
    v4 (B, H, n_k, d_v), finite (B, H, n_k).
    """
    weights = finite.to(v4.dtype).unsqueeze(-1)  # (B, H, n_k, 1)
    count = weights.sum(-2).clamp_min(1)  # (B, H, 1)
    v_mean = (weights * v4).sum(-2) / count  # (B, H, d_v)

    def through_scores(q, k):  # s q_i (K^T V / c) - s (q_i . k_bar) v_bar
        k_v = (weights * k).mT @ v4 / count.unsqueeze(-1)  # (B, H, d, d_v)
        k_mean = (weights * k).sum(-2) / count  # (B, H, d)
        along_keys = (q * k_mean[:, :, None, None]).sum(-1, keepdim=True)  # (B, H, G, n_q, 1)
        return scale * (q @ k_v.unsqueeze(2) - along_keys * v_mean[:, :, None, None])

    average = v_mean[:, :, None, None] + through_scores(q5, k4) - through_scores(q5.detach(), k4.detach())
    return torch.where((denominator == 0).unsqueeze(-1), average, out)


def _empty_attention(q, k, v, attn_mask, layout):
    """SDPA's result when an axis is empty: nothing, or zeros where there are no keys, still
    connected to every input so that gradients (zeros, or empty) come back as SDPA's do."""
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None and attn_mask.is_floating_point() else [])
    zero = sum(t.flatten()[:0].sum() for t in inputs)  # an exact 0 even for NaN inputs
    return q.new_zeros(layout.out_shape) + zero.to(q.dtype)


def check_tensors(q, k, v, enable_gqa):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., n, d), at least 2 dimensions, got {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"query, key, value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query and key must have the same last dimension, got query {tuple(q.shape)} and key {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"key and value must have the same number of keys, got key {tuple(k.shape)} and value {tuple(v.shape)}")
    if enable_gqa:
        if q.dim() < 3:
            raise ValueError(f"enable_gqa needs a head axis (..., H, n, d), got query {tuple(q.shape)}")
        for name, t in (("key", k), ("value", v)):
            if t.dim() >= 3 and q.shape[-3] % t.shape[-3]:
                raise ValueError(
                    f"with enable_gqa, query heads ({q.shape[-3]}) must be a multiple of {name} heads ({t.shape[-3]})")


MASKED_ROWS = ("visible", "all")


def check_flags(dropout_p, is_causal):
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise ValueError(
            f"dropout_p must be 0.0, got {dropout_p!r}: dropout on the attention weights is not supported "
            f"(the weights are never formed); apply dropout elsewhere, or keep exact attention while training"
        )


def check_degree(degree):
    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= MAX_DEGREE:
        raise ValueError(f"degree must be an int in [1, {MAX_DEGREE}], got {degree!r}")


def check_scale(scale, head_dim) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0  # d = 0: every score is 0 anyway
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return scale


def key_padding_mask(attn_mask, q, k, v, enable_gqa):
    """attn_mask checked against SDPA's rules and reduced to (..., 1, n_k or 1), or ValueError
    if it is not a key-padding mask."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, q.dtype):
        raise ValueError(
            f"attn_mask must be boolean, float32 or query's dtype ({q.dtype}), got {attn_mask.dtype}")
    n_q, n_k = q.shape[-2], k.shape[-2]
    shape = tuple(attn_mask.shape)
    target = _output_lead(q.shape, k.shape, v.shape, enable_gqa) + (n_q, n_k)
    if attn_mask.dim() < 2 or attn_mask.dim() > len(target) or any(
            size not in (1, full) for size, full in zip(reversed(shape), reversed(target))):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to {target}")
    if shape[-2] != 1 and n_q > 1:
        if is_tracing(attn_mask):
            raise ValueError(
                f"attn_mask has a query axis (shape {shape}) that cannot be checked while tracing; "
                f"supported: {SUPPORTED_MASKS}"
            )
        if attn_mask.is_floating_point() and attn_mask.requires_grad and attn_mask.stride(-2) != 0:
            raise ValueError(
                f"attn_mask requires grad and has a query axis (shape {shape}): its gradient differs per query "
                f"row, which the factored op never forms; pass a key-padding mask of shape (..., 1, n_k), or an "
                f"expand of one (its gradient then reaches the (..., 1, n_k) tensor exactly)")
        with torch.no_grad():
            first = attn_mask[..., :1, :]
            if not torch.equal(attn_mask, first.expand(shape)):
                raise ValueError(
                    f"attn_mask varies along the query axis (shape {shape}); supported: {SUPPORTED_MASKS}")
        # Equal rows of an expand: their mean has the same value, and a gradient that reaches the
        # expanded (..., 1, n_k) tensor as SDPA's per-entry gradient does, summed.
        return attn_mask.mean(-2, keepdim=True) if attn_mask.is_floating_point() else first
    return attn_mask[..., :1, :]


def _output_lead(q_shape, k_shape, v_shape, enable_gqa) -> tuple[int, ...]:
    """The leading (batch, head) axes of the output, as SDPA broadcasts them."""
    k_lead, v_lead = list(k_shape[:-2]), list(v_shape[:-2])
    if enable_gqa:  # key/value heads repeated up to the query heads, then broadcast
        for lead in (k_lead, v_lead):
            if lead:
                lead[-1] = q_shape[-3]
    try:
        return tuple(torch.broadcast_shapes(q_shape[:-2], tuple(k_lead), tuple(v_lead)))
    except RuntimeError:
        raise ValueError(
            f"query {tuple(q_shape)}, key {tuple(k_shape)} and value {tuple(v_shape)} do not broadcast over "
            f"their batch and head axes; for fewer key/value heads than query heads pass enable_gqa=True"
        ) from None


class OperandLayout:
    """How SDPA's broadcast operands map onto the kernel's q (B, 1, G, n_q, d), k (B, 1, n_k, d).

    Every leading output axis is a *key axis* (keys differ along it: one state each, B) or a
    *group axis* (key, value and mask are broadcast along it, queries are not: the queries
    share one state, G). GQA splits the query head axis into (key/value heads, group).
    """

    def __init__(self, q_shape, k_shape, v_shape, mask_shape, enable_gqa):
        self.n_q, self.n_k, self.value_dim = q_shape[-2], k_shape[-2], v_shape[-1]
        self.out_shape = _output_lead(q_shape, k_shape, v_shape, enable_gqa) + (self.n_q, self.value_dim)
        q_lead, k_lead, v_lead = list(q_shape[:-2]), list(k_shape[:-2]), list(v_shape[:-2])
        m_lead = None if mask_shape is None else list(mask_shape[:-2])
        kv_heads = k_lead[-1] if k_lead else 1
        # key and value with different head counts: repeated to the query heads (rare, and exact)
        self.repeat_kv = enable_gqa and (k_lead[-1:] or [1]) != (v_lead[-1:] or [1])
        self.split_heads = (enable_gqa and not self.repeat_kv and k_lead and q_shape[-3] != kv_heads)
        if self.repeat_kv:
            k_lead[-1:] = v_lead[-1:] = [q_shape[-3]]
        if self.split_heads:  # query head h reads key head h // G: (H_q,) -> (H_k, G)
            groups = q_shape[-3] // kv_heads
            q_lead[-1:] = [kv_heads, groups]
            k_lead.append(1)
            v_lead.append(1)
            if m_lead:
                m_lead[-1:] = [kv_heads, groups] if m_lead[-1] != 1 else [1, 1]
        lead = list(torch.broadcast_shapes(*(tuple(x) for x in (q_lead, k_lead, v_lead, m_lead or []))))
        pad = lambda x: [1] * (len(lead) - len(x)) + x  # noqa: E731
        self.q_lead, self.k_lead, self.v_lead = pad(q_lead), pad(k_lead), pad(v_lead)
        self.m_lead = None if m_lead is None else pad(m_lead)
        self.lead = lead
        self.group_axes = [a for a, size in enumerate(lead)
                           if size > 1 and self.k_lead[a] == self.v_lead[a] == 1
                           and (self.m_lead is None or self.m_lead[a] == 1)]
        self.key_axes = [a for a in range(len(lead)) if a not in self.group_axes]
        self.batch_heads = math.prod(lead[a] for a in self.key_axes)
        self.groups = math.prod(lead[a] for a in self.group_axes)
        self.rows = max(self.n_q * self.groups, self.n_k, 1)
        self.is_empty = 0 in self.out_shape or self.n_k == 0

    @classmethod
    def of(cls, q, k, v, mask, enable_gqa):
        return cls(q.shape, k.shape, v.shape, None if mask is None else mask.shape, enable_gqa)

    def apply(self, q, k, v, mask):
        """q5 (B, 1, G, n_q, d), k4 (B, 1, n_k, d), v4 (B, 1, n_k, d_v), mask (B, 1, n_k) or None."""
        if self.repeat_kv:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        if self.split_heads:
            q = q.unflatten(-3, (k.shape[-3], -1))
            k, v = k.unsqueeze(-3), v.unsqueeze(-3)
            if mask is not None and mask.dim() >= 3:
                mask = mask.unflatten(-3, (k.shape[-4], -1)) if mask.shape[-3] != 1 else mask.unsqueeze(-3)
        depth = len(self.lead)
        key_sizes = [self.lead[a] if a in self.key_axes else 1 for a in range(depth)]
        order = self.key_axes + self.group_axes + [depth, depth + 1]
        q = _padded(q, depth).expand(*self.lead, *q.shape[-2:]).permute(order)
        q5 = q.reshape(self.batch_heads, 1, self.groups, self.n_q, q.shape[-1])
        k4 = _padded(k, depth).expand(*key_sizes, *k.shape[-2:]).reshape(self.batch_heads, 1, self.n_k, k.shape[-1])
        v4 = _padded(v, depth).expand(*key_sizes, *v.shape[-2:]).reshape(self.batch_heads, 1, self.n_k, v.shape[-1])
        if mask is not None:
            mask = _padded(mask, depth).expand(*key_sizes, 1, self.n_k).reshape(self.batch_heads, 1, self.n_k)
        return q5, k4, v4, mask

    def restore(self, out):
        """out (B, 1, G, n_q, d_v) -> SDPA's output shape."""
        sizes = [self.lead[a] for a in self.key_axes + self.group_axes]
        out = out.reshape(*sizes, self.n_q, out.shape[-1])
        inverse = [0] * len(self.lead)
        for position, axis in enumerate(self.key_axes + self.group_axes):
            inverse[axis] = position
        out = out.permute(*inverse, len(self.lead), len(self.lead) + 1)
        return out.reshape(self.out_shape)


def _padded(t, depth):
    """t with leading size-1 axes up to `depth` leading axes (before its last two)."""
    return t.reshape((1,) * (depth - (t.dim() - 2)) + tuple(t.shape))
