"""`lowrank_attention`: the public op, with the argument semantics of F.scaled_dot_product_attention.

This module owns what a caller sees: argument checking, the layouts SDPA accepts (any leading
batch dimensions, GQA heads), masks turned into key weights, dtypes, and the choice of
polynomial. The arithmetic lives in `lrcompile.factored`.
"""

from __future__ import annotations

import math
import warnings

import torch

from lrcompile.factored import centre_keys, factored_attention
from lrcompile.features import feature_dim, is_tracing
from lrcompile.guard import ON_INACCURATE
from lrcompile.polynomial import ExpPolynomial, exp_polynomial

SUPPORTED_MASKS = "None, is_causal, or a key-padding mask broadcast over queries (shape (..., 1, n_k))"


def lowrank_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    degree: int = 2,
    approximation: str = "taylor",
    *,
    bound: float | None = None,
    chunk_size: int | None = None,
    max_error: float = 0.01,
    on_inaccurate: str = "allow",
    site_label: str = "lowrank_attention",
) -> torch.Tensor:
    """Softmax attention with exp replaced by a degree-`degree` polynomial, in O(n r d).

    Arguments follow `F.scaled_dot_product_attention`: q (..., [H_q,] n_q, d), k (..., [H_k,] n_k, d),
    v (..., [H_k,] n_k, d_v); `enable_gqa` lets H_q be a multiple of H_k.

    attn_mask: None, or a key-padding mask broadcast over the query axis, boolean (True = attend)
        or additive float. Masks that vary along the query axis raise ValueError. Unlike SDPA,
        a key-padding mask may be combined with `is_causal`.
    is_causal: SDPA's top-left aligned causal mask, computed in chunks with a running state.
    degree, approximation: the polynomial ("taylor" or "chebyshev", see lrcompile.polynomial).
    bound: score range B the polynomial must be accurate and positive on. None: not needed for
        even Taylor degrees (positive everywhere, coefficients independent of B); otherwise
        estimated from the inputs as s max|q| max|k - mu| (eager mode only). Non-causal keys
        are centred on their mean (mu), which leaves softmax unchanged and narrows the range;
        causal keys are not (mu = 0), since the mean would leak later keys into earlier outputs.
    chunk_size: rows per chunk (memory/speed trade-off); None picks one.
    max_error, on_inaccurate, site_label: the accuracy guard (lrcompile.guard). Called directly, the op
        computes the polynomial attention it was asked for ("allow"); the backend's rewrites pass
        the policy's "exact" / "warn" / "error", and `site_label` names the counters of lrcompile.stats().

    Low-precision inputs are computed in float32 and returned in their own dtype.
    """
    _check_tensors(q, k, v, enable_gqa)
    head_dim, d_v = q.shape[-1], v.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not scale > 0 or math.isinf(scale):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    q5, k4, v4, mask, restore = _to_kernel_layout(q, k, v, attn_mask, enable_gqa)
    key_weight = None if mask is None else key_weights(mask, compute_dtype)
    q5, k4, v4 = q5.to(compute_dtype), k4.to(compute_dtype), v4.to(compute_dtype)
    polynomial = choose_polynomial(degree, approximation, bound, q5, k4, key_weight, scale, bool(is_causal))
    chunk = chunk_size if chunk_size is not None else default_chunk_size(head_dim, degree, is_causal)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    check_guard(max_error, on_inaccurate)
    out = factored_attention(q5, k4, v4, key_weight, list(polynomial.coefficients), scale, bool(is_causal), chunk,
                             float(max_error), on_inaccurate, str(site_label))[0]
    return restore(out).to(q.dtype)


def check_guard(max_error, on_inaccurate):
    if on_inaccurate not in ON_INACCURATE:
        raise ValueError(f"on_inaccurate must be one of {ON_INACCURATE}, got {on_inaccurate!r}")
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error < math.inf:
        raise ValueError(f"max_error must be a finite number >= 0, got {max_error!r}")


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
    if bound is None and approximation == "taylor" and isinstance(degree, int) and degree % 2 == 0:
        # Even Taylor polynomials are positive on all of R and their coefficients 1/m! do not
        # depend on B, so no range is needed (and none is measured: no device sync).
        return exp_polynomial(degree, 1.0, "taylor")
    given = bound is not None
    if not given:
        if is_tracing(q):
            raise ValueError(
                f"approximation={approximation!r} with degree={degree!r} needs an explicit bound= "
                f"under torch.compile (the score range cannot be measured while tracing); only "
                f"even-degree taylor works without one"
            )
        bound = score_bound(q, k, key_weight, scale, causal)
    polynomial = exp_polynomial(degree, bound, approximation)
    positive_everywhere = approximation == "taylor" and degree % 2 == 0
    # An estimated bound is the measured range already; only a caller's bound can fall short of it.
    if given and not positive_everywhere and not is_tracing(q):
        measured = score_bound(q, k, key_weight, scale, causal)
        if measured > polynomial.bound:
            warnings.warn(
                f"the Cauchy-Schwarz estimate of the score range, {measured:.3g}, exceeds bound="
                f"{polynomial.bound:g}, where the {approximation} polynomial of degree {degree} is known "
                f"to be positive and accurate; if scores really go beyond it, weights may be wrong",
                stacklevel=3,
            )
    return polynomial


def score_bound(q: torch.Tensor, k: torch.Tensor, key_weight, scale: float, causal: bool) -> float:
    """A rigorous bound B on |s q . (k - mu)| over all queries and valid keys (Cauchy-Schwarz)."""
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
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q5, k4, _, mask, _ = _to_kernel_layout(q, k, v, attn_mask, enable_gqa)
    key_weight = None if mask is None else key_weights(mask, torch.float32)
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


def key_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A key-padding mask (..., n_k) as multiplicative key weights w >= 0.

    Boolean: w = 1 where True (attend). Additive float m: softmax(x + m) weights key j by
    e^{m_j}; shifting m by its maximum keeps w <= 1 and changes nothing after normalisation.
    """
    if mask.dtype == torch.bool:
        return mask.to(dtype)
    if not mask.is_floating_point():
        raise ValueError(f"attn_mask must be boolean or floating point, got dtype {mask.dtype}")
    mask = mask.to(dtype)
    peak = mask.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    return torch.exp(mask - peak)


def _check_tensors(q, k, v, enable_gqa):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., n, d), got {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dimension, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of keys, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[-2] == 0:
        raise ValueError(f"k must hold at least one key, got shape {tuple(k.shape)}")
    if enable_gqa:
        if q.dim() < 3:
            raise ValueError(f"enable_gqa needs a head axis (..., H, n, d), got q {tuple(q.shape)}")
        if not q.dim() == k.dim() == v.dim() or q.shape[:-3] != k.shape[:-3] or k.shape[:-2] != v.shape[:-2]:
            raise ValueError(
                f"with enable_gqa, q, k, v must share their batch axes, got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if q.shape[-3] % k.shape[-3]:
            raise ValueError(
                f"with enable_gqa, query heads ({q.shape[-3]}) must be a multiple of key/value heads ({k.shape[-3]})"
            )
    elif not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise ValueError(
            f"q, k, v must share their batch and head axes, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}; for fewer key/value heads than query heads pass enable_gqa=True"
        )


def _to_kernel_layout(q, k, v, attn_mask, enable_gqa):
    """Reshape to the kernel's (B, H, G, n_q, d) / (B, H, n_k, d) layout; return how to undo it."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if enable_gqa:
        query_heads, heads = q.shape[-3], k.shape[-3]
        lead = q.shape[:-3]
    else:
        query_heads = heads = 1
        lead = q.shape[:-2]
    groups = query_heads // heads
    mask = None if attn_mask is None else _key_padding_mask(attn_mask, q, n_q, n_k)
    if mask is not None and groups > 1 and mask.dim() >= 3 and mask.shape[-3] != 1:
        # Heads of one group see different masks, so they cannot share a key state: give every
        # query head its own copy of the keys.
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
        heads, groups = query_heads, 1
    batch = math.prod(lead)
    q5 = q.reshape(batch, heads, groups, n_q, q.shape[-1])
    k4 = k.reshape(batch, heads, n_k, k.shape[-1])
    v4 = v.reshape(batch, heads, n_k, v.shape[-1])
    if mask is not None:
        target = (*lead, query_heads, 1, n_k) if enable_gqa else (*lead, 1, n_k)
        try:
            mask = mask.expand(target)
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}") from None
        mask = mask.reshape(batch, heads, groups, n_k)[:, :, 0]

    def restore(out):  # (B, H, G, n_q, d_v) -> q's leading axes + (n_q, d_v)
        return out.reshape(*q.shape[:-1], out.shape[-1])

    return q5, k4, v4, mask, restore


def _key_padding_mask(attn_mask, q, n_q, n_k):
    """attn_mask reduced to (..., 1, n_k), or ValueError if it is not a key-padding mask."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() == 0 or attn_mask.dim() > q.dim() or shape[-1] not in (1, n_k):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to {tuple(q.shape[:-1]) + (n_k,)}")
    if attn_mask.dim() == 1:
        return attn_mask.expand(n_k).unsqueeze(0)
    if shape[-2] not in (1, n_q):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to {tuple(q.shape[:-1]) + (n_k,)}")
    if shape[-2] != 1:
        if is_tracing(attn_mask) or attn_mask.requires_grad:
            raise ValueError(
                f"attn_mask has a query axis (shape {shape}) that cannot be checked here; supported: "
                f"{SUPPORTED_MASKS}"
            )
        if not torch.equal(attn_mask, attn_mask[..., :1, :].expand(shape)):
            raise ValueError(f"attn_mask varies along the query axis (shape {shape}); supported: {SUPPORTED_MASKS}")
        attn_mask = attn_mask[..., :1, :]
    return attn_mask.expand(*attn_mask.shape[:-1], n_k)
