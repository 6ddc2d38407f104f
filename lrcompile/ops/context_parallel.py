"""Context parallelism: one sequence sharded across the ranks of a process group, exchanging states.

    out = lrcompile.context_parallel_attention(q, k, v, attn_mask, is_causal=..., group=group)
    model = torch.compile(model, backend=lrcompile.backend(Policy(context_parallel=group, on_inaccurate="allow")))

Each rank holds a slice of the sequence (queries and keys; with cross-attention only the keys need
be sharded, every rank attending its own queries to all keys). Ring attention passes keys and
values round the ring, O(n d) bytes per rank per layer; the factored form needs only the sum of
the other ranks' states, r x (d_v + 1) per head whatever n is. In the notation of
lrcompile.kernels.reference (q' = sqrt(s) q, k' = sqrt(s) k - mu, W^ = w [V | 1], rank p's keys K_p):

Non-causal.  The mean mu of the valid keys is global: one all-reduce of (sum of valid sqrt(s) k,
             their count), so every rank centres by the mean one process would use on the whole
             sequence. Then S_p = psi(K'_p)^T W^_p, one all-reduce S = sum_p S_p, O^ = phi(Q'_p) S.
Causal.      Ranks hold contiguous slices in rank order, the same positions of queries and keys
             (n_q = n_k on each rank). mu = 0 (lrcompile.kernels.reference), so no mean is exchanged.
             Inside the rank the chunked sweep runs as on one process, from a zero state, and
             also returns S_p (its keys' total). An all-gather of the P states gives the exclusive
             prefix S_<p = sum_{p' < p} S_p', and O^ = O^_local + phi(Q'_p) S_<p: the local sweep
             does not wait for the other ranks.
Both.        out = O^[:, :d_v] / O^[:, d_v], 0 where the denominator is 0 (no key to attend to).

Backward (derived once).  With G^ the gradient of O^ (lrcompile.kernels.reference's G^), each rank's
phi(Q'_p) S costs it dq' = vjp_phi(S G^) and gives dS = R_p = phi(Q'_p)^T G^. The adjoint of an
all-reduce is an all-reduce, so non-causally every rank receives R = sum_p R_p and its keys get
dpsi = R W^, dW^ = psi R, exactly the single-process formulas; the centring's adjoint is one more
all-reduce (of d(key sum), d+1 numbers per head), giving the correction of every valid key by the
mean of all ranks' dk'. Causally, the adjoint of the all-gather is a reduce-scatter: rank p
receives R_>p = sum_{p' > p} R_p' for S_p, and its reverse sweep starts from R_>p instead of zero
(lrcompile.kernels.reference.Sweeps.causal_backward's later_query_state): the reverse scan over ranks.

So per layer and head a rank exchanges r (d_v + 1) numbers (plus d + 1) twice non-causally, and
P r (d_v + 1) causally (the all-gather); `collectives` lists them and
benchmarks/context_parallel.py compares their bytes with ring attention's.

The arithmetic is lrcompile.kernels.reference's sweeps (the fused C sweep for a rank's causal slice
where lrcompile.kernels.selector runs it, the torch sweeps over the C or torch feature maps
otherwise: lrcompile.kernels.cpu.CSweeps and reference.Sweeps), as three
custom ops (forward and backward each), so that under torch.compile the forward and backward
graphs hold one op per sweep and the collectives between them as functional collectives
(_c10d_functional.all_reduce / all_gather / reduce_scatter, each followed by its wait_tensor),
which Inductor can schedule around compute.
Outside the graph, in plain torch.distributed: the check that all ranks agree on shapes and
polynomial (`check_agreement`: per call in eager mode, once per compiled graph at compile time).
The accuracy guard's exact fallback needs every key on one rank: under context parallelism the
polynomial is the model (on_inaccurate="allow").
"""

from __future__ import annotations

import contextlib
import math
import struct
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from lrcompile.kernels import cpu, reference, selector
from lrcompile.kernels.interface import KernelConfig
from lrcompile.kernels.operands import append_ones, safe, with_key_weights
from lrcompile.math.features import feature_dim, is_tracing
from lrcompile.math.memory_budget import check_memory_budget
from lrcompile.math.polynomial import exp_polynomial, needs_bound, polynomial_without_bound
# lowrank_attention's own argument checks and layout, so that both ops accept exactly the same calls
from lrcompile.ops.attention import (OperandLayout, check_config_alone, check_degree, check_flags, check_scale,
                                     check_tensors, default_chunk_size, key_padding_mask)

_c10d = torch.ops._c10d_functional


class ContextParallelError(RuntimeError):
    """A collective of context-parallel attention failed: a rank died, or did not reach it in time."""


class ContextGroup(NamedTuple):
    """The process group a sequence is sharded over, by name (what functional collectives and an FX
    graph can hold), with this process's rank in it and its size."""

    name: str
    rank: int
    size: int


def resolve_group(group) -> ContextGroup:
    """A ProcessGroup, a one-dimensional DeviceMesh, a group name, or a ContextGroup -> ContextGroup."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.distributed_c10d import _resolve_process_group

    if isinstance(group, ContextGroup):
        return group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialised (dist.init_process_group)")
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"context_parallel takes a one-dimensional DeviceMesh (the sequence axis, e.g. "
                             f"mesh['cp']), got a mesh of shape {tuple(group.shape)}")
        group = group.get_group()
    elif isinstance(group, str):
        group = _resolve_process_group(group)
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"context_parallel takes a ProcessGroup, a one-dimensional DeviceMesh or a group name, "
                        f"got {type(group).__name__}")
    return ContextGroup(group.group_name, dist.get_rank(group), dist.get_world_size(group))


# ---- collectives ------------------------------------------------------------------------------

class Collective(NamedTuple):
    """One collective of a context-parallel call, per head-batch (B H) of the call."""

    phase: str       # "forward" | "backward"
    op: str          # "all_reduce" | "all_gather" | "reduce_scatter"
    what: str
    elements: int    # numbers this rank hands to the collective

    def bytes_sent(self, world_size: int, element_bytes: int) -> float:
        """Bytes one rank sends, by the ring algorithms of NCCL and gloo: an all-reduce of M sends
        2 (P - 1) / P M, an all-gather of M per rank (P - 1) M, a reduce-scatter of P M (P - 1) M."""
        size = self.elements * element_bytes
        if self.op == "all_reduce":
            return 2 * (world_size - 1) / world_size * size
        if self.op == "all_gather":
            return (world_size - 1) * size
        return (world_size - 1) / world_size * size  # reduce_scatter: elements are its input, P M


def collectives(causal: bool, batch_heads: int, head_dim: int, value_dim: int, degree: int, world_size: int,
                float_mask: bool = False) -> list[Collective]:
    """The collectives one call makes, forward and backward, and what each exchanges."""
    state = batch_heads * feature_dim(head_dim, degree) * (value_dim + 1)
    peak = [Collective("forward", "all_reduce", "float mask's largest entry (max)", batch_heads)] if float_mask else []
    if causal:
        return peak + [Collective("forward", "all_gather", "key states S_p, for the prefix S_<p", state),
                       Collective("backward", "reduce_scatter", "query states R, for the suffix R_>p",
                                  world_size * state)]
    stats = batch_heads * (head_dim + 1)
    return peak + [Collective("forward", "all_reduce", "key sum and count, for the mean mu", stats),
                   Collective("forward", "all_reduce", "key state S", state),
                   Collective("backward", "all_reduce", "query state R", state),
                   Collective("backward", "all_reduce", "gradient of the key sum", stats)]


def describe(where: ContextGroup, site, degree: int, dtype: torch.dtype) -> str:
    """The context-parallel part of a site rewritten with `degree` (a passes.AttentionSite whose
    query is of `dtype`), for lrcompile.explain."""
    batch_heads = 1
    for size in site.key_shape[:-2]:
        batch_heads *= max(_size(size), 1)
    listed = collectives(site.is_causal, batch_heads, _size(site.query_shape[-1]), _size(site.value_shape[-1]),
                         degree, where.size)
    element_bytes = selector.compute_dtype(dtype).itemsize
    parts = [f"{c.phase} {c.op} of {c.what} ({c.elements} numbers, {_kib(c.bytes_sent(where.size, element_bytes))} "
             f"sent per rank)" for c in listed]
    return f"rank {where.rank} of {where.size} (group {where.name!r}): " + "; ".join(parts)


def _kib(size: float) -> str:
    return f"{size / 1024:.3g} KiB"


_PAYLOADS: list[tuple[str, int]] | None = None


@contextlib.contextmanager
def counting_payloads():
    """Records (op, bytes handed to it) of every collective run eagerly inside the block."""
    global _PAYLOADS
    previous, _PAYLOADS = _PAYLOADS, []
    try:
        yield _PAYLOADS
    finally:
        _PAYLOADS = previous


def _collective(op: str, tensor: torch.Tensor, where: ContextGroup, run) -> torch.Tensor:
    if _PAYLOADS is not None and not is_tracing(tensor):
        _PAYLOADS.append((op, tensor.numel() * tensor.element_size()))
    if is_tracing(tensor):
        return _c10d.wait_tensor(run())
    try:
        return _c10d.wait_tensor(run())
    except RuntimeError as error:  # gloo and NCCL raise DistBackendError, a RuntimeError
        raise ContextParallelError(
            f"context-parallel attention, rank {where.rank} of {where.size} (group {where.name!r}): the {op} "
            f"did not complete: a rank failed, or did not reach it within the process group's timeout "
            f"({type(error).__name__}: {error})") from error


def _all_reduce(tensor, where: ContextGroup, reduce_op: str = "sum"):
    return _collective("all_reduce", tensor, where,
                       lambda: _c10d.all_reduce(tensor.contiguous(), reduce_op, where.name))


class _AllReduceSum(torch.autograd.Function):
    """Every rank gets sum_p x_p; its adjoint is the same all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, tensor, where):
        ctx.where = where
        return _all_reduce(tensor, where)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.where), None


class _AllGather(torch.autograd.Function):
    """(B, ...) per rank -> (P, B, ...), rank order; its adjoint a reduce-scatter of the gradients."""

    @staticmethod
    def forward(ctx, tensor, where):
        ctx.where = where
        gathered = _collective("all_gather", tensor, where, lambda: _c10d.all_gather_into_tensor(
            tensor.contiguous(), where.size, where.name))
        return gathered.view((where.size,) + tuple(tensor.shape))

    @staticmethod
    def backward(ctx, grad):
        where = ctx.where
        flat = grad.contiguous().flatten(0, 1)  # (P B, ...)
        return _collective("reduce_scatter", flat, where, lambda: _c10d.reduce_scatter_tensor(
            flat, "sum", where.size, where.name)), None


# ---- the op -----------------------------------------------------------------------------------

def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    group=None,
    degree: int = 2,
    approximation: str = "taylor",
    bound: float | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    config: KernelConfig | None = None,
    check_shapes: bool = True,
) -> torch.Tensor:
    """`lrcompile.lowrank_attention` of this rank's queries against the keys of every rank of `group`.

    query, key, value, attn_mask, is_causal, scale, enable_gqa: as lowrank_attention (and SDPA),
        holding this rank's slice of the sequence axis (-2): the same slice of queries and keys
        when causal (contiguous, in rank order); any queries and any keys otherwise. attn_mask is
        a key-padding mask over this rank's keys.
    group: a ProcessGroup, a one-dimensional DeviceMesh, or a group name. Or, instead, query, key
        and value as DTensors sharded along the sequence axis (placement Shard(ndim - 2)) on one
        one-dimensional mesh, the way torch shards a sequence: the group is their mesh, attn_mask
        a DTensor sharded along its last axis or this rank's slice, and the output a DTensor
        sharded like query.
    degree, approximation, bound, chunk_size, memory_budget, config: as lowrank_attention. A
        polynomial that needs a score range needs an explicit bound= (every rank must use one
        polynomial, and a range measured on one slice would differ from rank to rank).
    check_shapes: in eager mode, first check (one small all-gather) that all ranks agree on shapes,
        dtype and polynomial, raising ValueError otherwise instead of exchanging states that do not
        fit. Under torch.compile the backend checks once per site at compile time.

    Every rank of the group must call it, with the same arguments but the slice. The result, and
    every gradient, equals one process running lowrank_attention on the whole sequence (up to
    summation order), except in two corners of float masks that lowrank_attention treats apart: a
    sequence whose every key is masked by a value so negative that it absorbs the scores
    (finfo.min), and a causal row whose visible keys all have weight e^{m_j - peak} = 0 under a
    finite mask (lowrank_attention averages their values, as the eager spelling does).
    """
    if any(_is_dtensor(t) for t in (query, key, value, attn_mask)):
        return _on_dtensors(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, group,
                            dict(degree=degree, approximation=approximation, bound=bound, chunk_size=chunk_size,
                                 memory_budget=memory_budget, config=config, check_shapes=check_shapes))
    if group is None:
        raise TypeError("context_parallel_attention needs group= (a ProcessGroup, a one-dimensional DeviceMesh or a "
                        "group name), or query, key and value as DTensors sharded along the sequence axis")
    where = resolve_group(group)
    q, k, v = query, key, value
    check_tensors(q, k, v, enable_gqa)
    check_flags(dropout_p, is_causal)
    if config is not None:
        check_config_alone(config, degree=degree, approximation=approximation, bound=bound, chunk_size=chunk_size,
                           max_error=0.01, on_inaccurate="allow", site_label="lowrank_attention")
        degree, chunk_size, coefficients = config.degree, config.chunk_size, tuple(config.coefficients)
        implementation = config.implementation
    else:
        check_degree(degree)
        if bound is None and needs_bound(degree, approximation):
            raise ValueError(f"context parallelism with approximation={approximation!r}, degree={degree} needs an "
                             f"explicit bound=: every rank must use one polynomial (an even taylor degree needs none)")
        polynomial = (exp_polynomial(degree, bound, approximation) if bound is not None
                      else polynomial_without_bound(degree, approximation))
        coefficients, implementation = tuple(polynomial.coefficients), None
    head_dim = q.shape[-1]
    scale = check_scale(scale, head_dim)
    if scale < 0:
        k, scale = -k, -scale  # as lowrank_attention: the sign on the keys
    mask = None if attn_mask is None else key_padding_mask(attn_mask, q, k, v, enable_gqa)
    layout = OperandLayout.of(q, k, v, mask, enable_gqa)
    if is_causal and layout.n_q != layout.n_k:
        raise ValueError(f"causal context parallelism needs each rank to hold the same positions of queries and "
                         f"keys (contiguous slices in rank order), got {layout.n_q} queries and {layout.n_k} keys "
                         f"on rank {where.rank}")
    if head_dim == 0 or layout.n_k == 0 or 0 in layout.out_shape:
        raise ValueError(f"context parallelism needs a non-empty slice on every rank, got query {tuple(q.shape)}, "
                         f"key {tuple(k.shape)}, value {tuple(v.shape)} on rank {where.rank}")
    chunk = chunk_size if chunk_size is not None else default_chunk_size(head_dim, degree, is_causal)
    compute_dtype = selector.compute_dtype(q.dtype)
    if implementation is None:
        implementation = selector.select(q.device, compute_dtype, degree, head_dim, v.shape[-1])
    implementation = implementation if implementation in ("c", "torch") else "torch"  # no Triton sweep here
    float_mask = mask is not None and mask.is_floating_point()
    if check_shapes and not is_tracing(q):
        check_agreement(where, signature(layout, head_dim, v.shape[-1], is_causal, coefficients, scale,
                                         mask is not None, float_mask, compute_dtype))
    check_memory_budget(head_dim, v.shape[-1], degree, layout.batch_heads, min(chunk, layout.rows), compute_dtype,
                        memory_budget)

    q5, k4, v4, mask3 = layout.apply(q, k, v, mask)
    q5, k4, v4 = q5.to(compute_dtype), k4.to(compute_dtype), v4.to(compute_dtype)
    key_weight = None if mask3 is None else _key_weights(mask3, compute_dtype, where)
    run = _causal if is_causal else _non_causal
    out_hat = run(q5, k4, v4, key_weight, list(coefficients), scale, int(chunk), implementation, where)
    denominator = out_hat[..., -1:]
    # D = 0 only where a row sees no key of weight > 0: 0, as SDPA; and no gradient, as lrcompile.kernels.reference.
    out = torch.where(denominator == 0, 0.0, out_hat[..., :-1] / safe(denominator))
    return layout.restore(out).to(q.dtype)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _on_dtensors(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, group, options):
    """context_parallel_attention of sequence-sharded DTensors: on their local shards, over their mesh."""
    from torch.distributed.tensor import DTensor, Shard

    tensors = {"query": query, "key": key, "value": value}
    for name, t in tensors.items():
        placements = tuple(t.placements) if isinstance(t, DTensor) else None
        if placements is None or len(placements) != 1 or placements[0] != Shard(t.dim() - 2):
            raise ValueError(f"context_parallel_attention takes query, key and value all as DTensors sharded along "
                             f"the sequence axis on a one-dimensional mesh (placements (Shard({t.dim() - 2}),)), "
                             f"got {name} with placements {placements}")
    mesh = query.device_mesh
    if any(t.device_mesh != mesh for t in tensors.values()):
        raise ValueError("query, key and value must be DTensors on the same mesh")
    if group is not None and resolve_group(group).name != resolve_group(mesh).name:
        raise ValueError("group= names another group than the DTensors' mesh; pass one or the other")
    if isinstance(attn_mask, DTensor):
        if tuple(attn_mask.placements) != (Shard(attn_mask.dim() - 1),):
            raise ValueError(f"a DTensor attn_mask must be sharded along its key axis (Shard({attn_mask.dim() - 1})), "
                             f"got placements {tuple(attn_mask.placements)}")
        attn_mask = attn_mask.to_local()
    out = context_parallel_attention(query.to_local(), key.to_local(), value.to_local(), attn_mask, dropout_p,
                                     is_causal, scale, enable_gqa, group=mesh, **options)
    # the global shape: SDPA's output over the whole sequence, as query's layout
    shape = tuple(out.shape[:-2]) + (query.shape[-2], out.shape[-1])
    stride = tuple(torch.empty(shape, device="meta").stride())
    return DTensor.from_local(out, mesh, [Shard(out.dim() - 2)], shape=torch.Size(shape), stride=stride)


def _key_weights(mask3, dtype, where: ContextGroup):
    """lrcompile.ops.attention.key_weights with the float mask shifted by its largest entry over all ranks,
    as one process would shift it."""
    if mask3.dtype == torch.bool:
        return mask3.to(dtype)
    mask3 = mask3.to(dtype)
    peak = _all_reduce(mask3.detach().amax(-1, keepdim=True), where, "max")
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return torch.exp(mask3 - shift)


def _non_causal(q5, k4, v4, key_weight, coefficients, scale, chunk, implementation, where):
    """O^ (B, H, G, n_q, d_v + 1) of this rank's queries over every rank's keys."""
    root = scale**0.5
    k_scaled = k4 * root
    valid = torch.ones_like(k4[..., 0]) if key_weight is None else (key_weight > 0).to(k4.dtype)  # (B, H, n_k)
    key_sum = torch.cat([(valid.unsqueeze(-1) * k_scaled).sum(-2), valid.sum(-1, keepdim=True)], -1)  # (B, H, d + 1)
    key_sum = _AllReduceSum.apply(key_sum, where)
    mu = key_sum[..., :-1] / key_sum[..., -1:].clamp_min(1)  # the global mean of the valid keys
    weighted = with_key_weights(append_ones(v4), key_weight)  # W^ = w [V | 1]
    state = torch.ops.lrcompile.context_key_state(k_scaled - mu.unsqueeze(-2), weighted, coefficients, chunk,
                                                  implementation)
    state = _AllReduceSum.apply(state, where)
    return torch.ops.lrcompile.context_query_output(q5 * root, state, coefficients, chunk, implementation)


def _causal(q5, k4, v4, key_weight, coefficients, scale, chunk, implementation, where):
    root = scale**0.5
    rows = q5 * root
    weighted = with_key_weights(append_ones(v4), key_weight)  # W^ = w [V | 1]
    out_local, state = torch.ops.lrcompile.context_causal_local(rows, k4 * root, weighted, coefficients, chunk,
                                                                implementation)
    # Rank 0's prefix is empty, but it still takes part (its zero term keeps the reduce-scatter of
    # the backward on every rank).
    prefix = _AllGather.apply(state, where)[:where.rank].sum(0)  # S_<p (B, H, r, d_v + 1)
    return out_local + torch.ops.lrcompile.context_query_output(rows, prefix, coefficients, chunk, implementation)


# ---- agreement across ranks -------------------------------------------------------------------

SIGNATURE_FIELDS = ("batch x key/value heads", "query heads per key/value head", "head dim", "value dim",
                    "causal", "polynomial coefficients", "scale", "attn_mask given", "float mask", "compute dtype")


def signature(layout, head_dim, value_dim, causal, coefficients, scale, has_mask, float_mask, dtype) -> list[int]:
    """What every rank of a context-parallel call must agree on, as integers."""
    return [layout.batch_heads, layout.groups, head_dim, value_dim, int(causal), _float_bits(sum(
        c * (m + 1.5) for m, c in enumerate(coefficients))) ^ len(coefficients), _float_bits(scale), int(has_mask),
            int(float_mask), torch.finfo(dtype).bits]


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def check_agreement(where: ContextGroup, values: list[int], fields=SIGNATURE_FIELDS):
    """ValueError on every rank unless all ranks of the group hand in the same values (plain
    torch.distributed, outside any compiled graph)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    mine = torch.tensor(values, dtype=torch.int64)
    everyone = torch.empty(where.size * len(values), dtype=torch.int64)
    try:
        dist.all_gather_into_tensor(everyone, mine, group=_resolve_process_group(where.name))
        everyone = everyone.view(where.size, len(values))
    except RuntimeError as error:
        raise ContextParallelError(
            f"context-parallel attention, rank {where.rank} of {where.size}: the shape check did not complete: a "
            f"rank failed, or did not reach it within the process group's timeout ({type(error).__name__}: "
            f"{error})") from error
    differing = [name for column, name in enumerate(fields[:len(values)])
                 if not bool((everyone[:, column] == everyone[0, column]).all())]
    if differing:
        rows = "; ".join(f"rank {rank}: {dict(zip(fields, everyone[rank].tolist()))}"
                         for rank in range(where.size) if rank in (0, where.rank) or bool(
                             (everyone[rank] != everyone[0]).any()))
        raise ValueError(f"context-parallel attention: the ranks of group {where.name!r} disagree on "
                         f"{', '.join(differing)}; only the sequence axis may differ between ranks ({rows})")


def check_context_parallel_sites(decisions):
    """The backend's check, at compile time, for a graph rewritten under Policy(context_parallel=...).

    A site kept exact would attend only to this rank's slice: ValueError unless the policy's
    include/exclude patterns chose to keep it. Then every rank must have rewritten the same sites
    (kind, degree, sizes): checked by one all-gather, outside the compiled graph.
    """
    kept = [(site, decision) for site, decision in decisions if not decision.rewrite and not decision.chosen_by_user]
    if kept:
        site, decision = kept[0]
        raise ValueError(f"under context parallelism attention site {site.name} ({site.module_path or 'root'}) cannot "
                         f"be kept exact: it would attend only to this rank's slice of the sequence; it was kept "
                         f"because {decision.reason}. Exclude it by pattern if its inputs are not sharded")
    rewritten = [(site, decision) for site, decision in decisions if decision.rewrite]
    if not rewritten:
        return
    where = rewritten[0][1].context_parallel
    described = repr([(site.is_causal, decision.degree, [_size(x) for x in site.query_shape[:-2]],
                       _size(site.query_shape[-1]), _size(site.value_shape[-1])) for site, decision in rewritten])
    check_agreement(where, [len(rewritten), zlib.crc32(described.encode())], fields=(
        "number of rewritten attention sites", "the sites' causality, degree, heads and dimensions"))


def _size(x) -> int:
    """An int size, or a symbolic one's value on the example inputs (no guard installed)."""
    if isinstance(x, int):
        return x
    hint = getattr(getattr(x, "node", None), "hint", None)
    return int(hint) if hint is not None else -1


# ---- the sweeps, as custom ops ----------------------------------------------------------------
# Forward and backward are custom ops of their own, so that AOTAutograd's graphs hold one call per
# sweep (nothing unrolls with n) with the collectives between them, as lrcompile.ops.factored_op's.

def _sweeps(like, coefficients, causal, chunk_size, implementation) -> reference.Sweeps:
    # the C implementation's sweeps run its feature maps, and the whole sweep where it can, in C
    sweeps = cpu.CSweeps if implementation == "c" else reference.Sweeps
    return sweeps(like, coefficients, 1.0, causal, chunk_size)


@torch.library.custom_op("lrcompile::context_key_state", mutates_args=())
def context_key_state(keys: torch.Tensor, weighted: torch.Tensor, coefficients: list[float], chunk_size: int,
                      implementation: str) -> torch.Tensor:
    """S_p = sum_j psi(k'_j)^T W^_j over this rank's keys k' (B, H, n_k, d), W^ (B, H, n_k, e): (B, H, r, e)."""
    sweeps = _sweeps(keys, coefficients, False, chunk_size, implementation)
    state = sweeps.key_state(keys.flatten(0, 1).contiguous(), weighted.flatten(0, 1).contiguous())
    return state.unflatten(0, keys.shape[:2]).contiguous()


@context_key_state.register_fake
def _(keys, weighted, coefficients, chunk_size, implementation):
    return keys.new_empty(keys.shape[:2] + (feature_dim(keys.shape[-1], len(coefficients) - 1), weighted.shape[-1]))


@torch.library.custom_op("lrcompile::context_key_state_backward", mutates_args=())
def context_key_state_backward(keys: torch.Tensor, weighted: torch.Tensor, grad_state: torch.Tensor,
                               coefficients: list[float], chunk_size: int,
                               implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk' from dpsi = R W^, dW^ = psi R) for R = grad_state (B, H, r, e)."""
    sweeps = _sweeps(keys, coefficients, False, chunk_size, implementation)
    dk, d_weighted = sweeps.key_gradients(keys.flatten(0, 1).contiguous(), weighted.flatten(0, 1).contiguous(),
                                          grad_state.flatten(0, 1))
    return dk.unflatten(0, keys.shape[:2]).contiguous(), d_weighted.unflatten(0, keys.shape[:2]).contiguous()


@context_key_state_backward.register_fake
def _(keys, weighted, grad_state, coefficients, chunk_size, implementation):
    return keys.new_empty(keys.shape), weighted.new_empty(weighted.shape)


def _key_state_setup(ctx, inputs, output):
    keys, weighted, *ctx.config = inputs
    ctx.save_for_backward(keys, weighted)


def _key_state_autograd(ctx, grad_state):
    keys, weighted = ctx.saved_tensors
    dk, d_weighted = torch.ops.lrcompile.context_key_state_backward(keys, weighted, grad_state, *ctx.config)
    return dk, d_weighted, None, None, None


context_key_state.register_autograd(_key_state_autograd, setup_context=_key_state_setup)


@torch.library.custom_op("lrcompile::context_query_output", mutates_args=())
def context_query_output(rows: torch.Tensor, state: torch.Tensor, coefficients: list[float], chunk_size: int,
                         implementation: str) -> torch.Tensor:
    """O^ = phi(Q') S for q' (B, H, G, n_q, d), S (B, H, r, e): (B, H, G, n_q, e)."""
    sweeps = _sweeps(rows, coefficients, False, chunk_size, implementation)
    out_hat = sweeps.query_outputs(sweeps.query_rows(rows), state.flatten(0, 1))
    return sweeps.from_query_rows(out_hat, rows.shape).contiguous()


@context_query_output.register_fake
def _(rows, state, coefficients, chunk_size, implementation):
    return rows.new_empty(rows.shape[:-1] + (state.shape[-1],))


@torch.library.custom_op("lrcompile::context_query_output_backward", mutates_args=())
def context_query_output_backward(rows: torch.Tensor, state: torch.Tensor, grad_out: torch.Tensor,
                                  coefficients: list[float], chunk_size: int,
                                  implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq' = vjp_phi(S G^), R = phi(Q')^T G^) for G^ = grad_out (B, H, G, n_q, e)."""
    sweeps = _sweeps(rows, coefficients, False, chunk_size, implementation)
    dq, query_state = sweeps.query_gradients(sweeps.query_rows(rows), sweeps.query_rows(grad_out),
                                             state.flatten(0, 1))
    return (sweeps.from_query_rows(dq, rows.shape).contiguous(),
            query_state.unflatten(0, state.shape[:2]).contiguous())


@context_query_output_backward.register_fake
def _(rows, state, grad_out, coefficients, chunk_size, implementation):
    return rows.new_empty(rows.shape), state.new_empty(state.shape)


def _query_output_setup(ctx, inputs, output):
    rows, state, *ctx.config = inputs
    ctx.save_for_backward(rows, state)


def _query_output_autograd(ctx, grad_out):
    rows, state = ctx.saved_tensors
    dq, d_state = torch.ops.lrcompile.context_query_output_backward(rows, state, grad_out, *ctx.config)
    return dq, d_state, None, None, None


context_query_output.register_autograd(_query_output_autograd, setup_context=_query_output_setup)


@torch.library.custom_op("lrcompile::context_causal_local", mutates_args=())
def context_causal_local(rows: torch.Tensor, keys: torch.Tensor, weighted: torch.Tensor, coefficients: list[float],
                         chunk_size: int, implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's causal sweep from a zero state: (O^ of its own keys (B, H, G, n, e), S_p (B, H, r, e))."""
    sweeps = _sweeps(rows, coefficients, True, chunk_size, implementation)
    q_rows, k_rows = sweeps.query_rows(rows), keys.flatten(0, 1).contiguous()
    w_rows = weighted.flatten(0, 1).contiguous()
    in_c = sweeps.whole_sweep(q_rows)  # the fused C sweep, where lrcompile.kernels.cpu runs it
    if in_c is not None:
        out_t, state_t = in_c.forward(q_rows, k_rows, w_rows, rows.shape[2])
        out_hat, state = out_t.mT, state_t.mT
    else:
        out_hat, state = sweeps.causal_forward(q_rows, k_rows, w_rows, groups=rows.shape[2])
    return (sweeps.from_query_rows(out_hat, rows.shape).contiguous(),
            state.unflatten(0, keys.shape[:2]).contiguous())


@context_causal_local.register_fake
def _(rows, keys, weighted, coefficients, chunk_size, implementation):
    r = feature_dim(keys.shape[-1], len(coefficients) - 1)
    out_hat = rows.new_empty(rows.shape[:-1] + (weighted.shape[-1],))
    return out_hat, keys.new_empty(keys.shape[:2] + (r, weighted.shape[-1]))


@torch.library.custom_op("lrcompile::context_causal_local_backward", mutates_args=())
def context_causal_local_backward(rows: torch.Tensor, keys: torch.Tensor, weighted: torch.Tensor,
                                  state: torch.Tensor, grad_out: torch.Tensor, grad_state: torch.Tensor,
                                  coefficients: list[float], chunk_size: int,
                                  implementation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq', dk', dW^): the reverse sweep, starting from R_>p = grad_state (the later ranks' queries)."""
    sweeps = _sweeps(rows, coefficients, True, chunk_size, implementation)
    groups = rows.shape[2]
    q_rows, k_rows = sweeps.query_rows(rows), keys.flatten(0, 1).contiguous()
    w_rows = weighted.flatten(0, 1).contiguous()
    g_rows, later = sweeps.query_rows(grad_out), grad_state.flatten(0, 1)
    in_c = sweeps.whole_sweep(q_rows)
    if in_c is not None:
        # The C sweep starts from R = 0; the later ranks' R_>p reaches every key linearly, so its
        # share is added by one more pass over the keys (dpsi = R_>p W^, dW^ = psi R_>p).
        dq, dk, d_weighted_t = in_c.backward(q_rows, k_rows, w_rows, g_rows, state.flatten(0, 1).mT.contiguous(),
                                             groups)
        dk_later, d_weighted_later = sweeps.key_gradients(k_rows, w_rows, later)
        dk, d_weighted = dk + dk_later, d_weighted_t.mT + d_weighted_later
    else:
        dq, dk, d_weighted = sweeps.causal_backward(q_rows, k_rows, w_rows, g_rows, state.flatten(0, 1), groups,
                                                    later_query_state=later)
    return (sweeps.from_query_rows(dq, rows.shape).contiguous(), dk.unflatten(0, keys.shape[:2]).contiguous(),
            d_weighted.unflatten(0, keys.shape[:2]).contiguous())


@context_causal_local_backward.register_fake
def _(rows, keys, weighted, state, grad_out, grad_state, coefficients, chunk_size, implementation):
    return rows.new_empty(rows.shape), keys.new_empty(keys.shape), weighted.new_empty(weighted.shape)


def _causal_local_setup(ctx, inputs, output):
    rows, keys, weighted, *ctx.config = inputs
    ctx.save_for_backward(rows, keys, weighted, output[1])


def _causal_local_autograd(ctx, grad_out, grad_state):
    rows, keys, weighted, state = ctx.saved_tensors
    if grad_out is None:
        grad_out = rows.new_zeros(rows.shape[:-1] + (weighted.shape[-1],))
    if grad_state is None:
        grad_state = torch.zeros_like(state)
    dq, dk, d_weighted = torch.ops.lrcompile.context_causal_local_backward(rows, keys, weighted, state, grad_out,
                                                                          grad_state, *ctx.config)
    return dq, dk, d_weighted, None, None, None


context_causal_local.register_autograd(_causal_local_autograd, setup_context=_causal_local_setup)


def ring_attention_bytes(n: int, world_size: int, head_dim: int, value_dim: int, element_bytes: int,
                         batch_heads: int = 1) -> float:
    """Bytes one rank sends per layer in ring attention, forward and backward: P - 1 steps of its
    keys and values forward; keys, values and their gradients' accumulators backward
    (ring-flash-attention, torch's context_parallel): 3 (P - 1) (n / P) (d + d_v) per head."""
    return 3 * (world_size - 1) * math.ceil(n / world_size) * (head_dim + value_dim) * element_bytes * batch_heads
