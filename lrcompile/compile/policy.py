"""`Policy`: what the user decides, and `decide`: the per-site decision it implies (docs/design.md section 5).

Order, per site: include/exclude -> supported? -> key length >= min_seq_len -> degree (fixed, or
"auto" from tolerance and bound) -> feature states fit memory_budget -> cost model -> rewrite (with
the accuracy guard's max_error and on_inaccurate, applied per call by lrcompile.ops.guard). Conditions on sequence lengths are
evaluated on the graph's sizes; when those are symbolic (dynamic shapes), evaluating them installs
a guard, so a new shape on the other side of the threshold recompiles instead of taking the
wrong path.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch

from lrcompile.compile import calibration, cost_model
from lrcompile.kernels import selector
from lrcompile.kernels.interface import KernelConfig
from lrcompile.kernels.selector import KernelUnavailableError
from lrcompile.math import flops
from lrcompile.math.features import feature_dim
from lrcompile.math.memory_budget import MemoryBudgetError, check_memory_budget
from lrcompile.math.polynomial import (APPROXIMATIONS, MAX_DEGREE, ExpPolynomial, NotPositiveError, degree_for,
                                       exp_polynomial, needs_bound, polynomial_without_bound)
from lrcompile.ops import algorithm, guard
from lrcompile.ops.attention import default_chunk_size
from lrcompile.ops.context_parallel import resolve_group
from lrcompile.ops.guard import ON_INACCURATE
from passes.graph_walk import dtype_of

ON_UNSUPPORTED = ("keep", "warn", "error")


@dataclass(frozen=True)
class Policy:
    """Which attention sites to rewrite, and how. See README, "Policies"."""

    degree: int | str = 2
    approximation: str = "taylor"
    bound: float | None = None
    tolerance: float | None = None
    min_seq_len: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    causal_chunk: int | None = None
    on_unsupported: str = "keep"
    cost_model: bool = True  # False: rewrite every eligible site, even where exact is cheaper
    max_error: float = 0.01  # largest estimated output error a call may have (lrcompile.ops.guard)
    on_inaccurate: str = "exact"  # "exact" | "warn" | "error" | "allow": what a call above max_error does
    memory_budget: int | None = None  # bytes a site's feature states may take; None: DEFAULT_MEMORY_BUDGET
    # A ProcessGroup, 1-D DeviceMesh or group name the sequence is sharded over (lrcompile.ops.context_parallel):
    # rewritten sites exchange states with the other ranks. None: every rank attends to its own tensors.
    context_parallel: object = None

    def __post_init__(self):
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, (tuple, list, set, frozenset)) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"{name} must be a string or a sequence of fnmatch patterns (strings), got {value!r}")
            else:
                object.__setattr__(self, name, tuple(value))
        _check_type("cost_model", self.cost_model, bool, "True or False")
        _check_type("on_unsupported", self.on_unsupported, str, f"one of {ON_UNSUPPORTED}")
        _check_type("on_inaccurate", self.on_inaccurate, str, f"one of {ON_INACCURATE}")
        _check_type("approximation", self.approximation, str, f"one of {APPROXIMATIONS}")
        for name in ("bound", "tolerance"):
            if getattr(self, name) is not None:
                _check_type(name, getattr(self, name), (int, float), "a number or None")
        _check_type("max_error", self.max_error, (int, float), "a number")
        if self.memory_budget is not None:
            _check_type("memory_budget", self.memory_budget, (int, float), "a number of bytes or None")
            if not 0 < self.memory_budget < math.inf:
                raise ValueError(f"memory_budget must be a positive number of bytes, got {self.memory_budget!r}")
        guard.check_settings(self.max_error, self.on_inaccurate)
        if self.degree != "auto" and (isinstance(self.degree, bool) or not isinstance(self.degree, int)
                                      or not 1 <= self.degree <= MAX_DEGREE):
            raise ValueError(f"degree must be an int in [1, {MAX_DEGREE}] or 'auto', got {self.degree!r}")
        if self.degree == "auto" and self.tolerance is None:
            raise ValueError("degree='auto' needs a tolerance (target entrywise relative error of exp)")
        if self.approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {APPROXIMATIONS}, got {self.approximation!r}")
        if self.bound is not None and not (0 < self.bound < math.inf):
            raise ValueError(f"bound must be a finite positive number or None, got {self.bound!r}")
        if self.tolerance is not None and not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1) or None, got {self.tolerance!r}")
        if isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be a non-negative int, got {self.min_seq_len!r}")
        if self.causal_chunk is not None and (isinstance(self.causal_chunk, bool) or not isinstance(self.causal_chunk, int)
                                              or self.causal_chunk < 1):
            raise ValueError(f"causal_chunk must be a positive int or None, got {self.causal_chunk!r}")
        if self.on_unsupported not in ON_UNSUPPORTED:
            raise ValueError(f"on_unsupported must be one of {ON_UNSUPPORTED}, got {self.on_unsupported!r}")
        if self.context_parallel is not None:
            _check_context_parallel(self)

    @property
    def needs_score_range(self) -> bool:
        """Whether decisions depend on the sites' score ranges (measured when bound is None)."""
        return (self.degree == "auto" or self.tolerance is not None
                or needs_bound(self.degree, self.approximation))


def _check_context_parallel(policy: Policy):
    from torch.distributed.device_mesh import DeviceMesh

    group = policy.context_parallel
    if not isinstance(group, (torch.distributed.ProcessGroup, DeviceMesh, str)):
        raise TypeError(f"context_parallel must be a ProcessGroup, a one-dimensional DeviceMesh or a group name, "
                        f"got {type(group).__name__}")
    if policy.on_inaccurate != "allow":
        raise ValueError(f"context_parallel needs on_inaccurate='allow' (got {policy.on_inaccurate!r}): the accuracy "
                         f"guard's exact fallback needs every key on one rank, so under context parallelism the "
                         f"polynomial is the model")


def _check_type(name, value, types, accepted):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TypeError(f"{name} must be {accepted}, got {value!r}")
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")


@dataclass
class Decision:
    rewrite: bool
    reason: str = ""  # why kept; "" when rewritten
    degree: int | None = None
    polynomial: ExpPolynomial | None = None
    feature_dim: int | None = None
    score_range: float | None = None  # the B the decision used (policy's bound or measured)
    chunk_size: int | None = None
    flops_exact: float | None = None
    flops_lowrank: float | None = None  # the factored algorithm's: what the cost model's calibration measured
    flops_direct: float | None = None  # set where the direct algorithm runs
    algorithm: str = ""  # "direct" | "factored": what the op runs at this shape (lrcompile.ops.algorithm);
                         # "" when kept, or when the lengths are symbolic (then the op decides per shape)
    kernel: selector.Choice | None = None  # the implementation (and sweep) the site's calls run
    config: KernelConfig | None = None  # what the kernel runs with, when rewritten
    context_parallel: object = None  # ops.context_parallel.ContextGroup, when the site's calls exchange states
    chosen_by_user: bool = False  # kept by the policy's include/exclude patterns
    lowrank_kwargs: dict = field(default_factory=dict)  # passed to lowrank_attention: config, memory_budget
    calibration: str = ""  # which cost-model calibration decided, or why none applies ("" : cost model off)


CONTEXT_PARALLEL_MASKED_ROWS = (
    "the mask's causal part removes keys with a finite fill (transformers' eager masks), so a left-padded row "
    "averages every key of the sequence; context parallelism averages the keys it sees (use the sdpa spelling)")


def decide(site, policy: Policy, measured_range: float | None = None) -> Decision:
    """The decision for one `passes.AttentionSite` under `policy`."""
    path = site.module_path or "<root>"
    if policy.include and not any(fnmatch.fnmatchcase(path, p) for p in policy.include):
        return Decision(False, f"module {path} matches no include pattern {list(policy.include)}", chosen_by_user=True)
    matched = [p for p in policy.exclude if fnmatch.fnmatchcase(path, p)]
    if matched:
        return Decision(False, f"module {path} excluded by pattern {matched[0]!r}", chosen_by_user=True)
    if not site.supported:
        return Decision(False, site.reason)

    q_shape, k_shape, v_shape = _shapes(site)
    n_q, n_k, head_dim, value_dim = q_shape[-2], k_shape[-2], q_shape[-1], v_shape[-1]
    if _holds(n_k < policy.min_seq_len):
        return Decision(False, f"key length {n_k} < min_seq_len {policy.min_seq_len}")

    score_range = policy.bound if policy.bound is not None else measured_range
    decision = _choose_degree(policy, score_range)
    if not decision.rewrite:
        return decision
    degree = decision.degree
    decision.feature_dim = feature_dim(int(head_dim), degree)
    decision.score_range = score_range

    causal = site.is_causal
    chunk = policy.causal_chunk if causal and policy.causal_chunk else default_chunk_size(int(head_dim), degree, causal)
    batch_heads = math.prod(q_shape[:-2])
    kv_ratio = math.prod(k_shape[:-2]) / batch_heads
    decision.chunk_size = chunk
    try:
        check_memory_budget(head_dim, value_dim, degree, math.prod(k_shape[:-2]), chunk, budget=policy.memory_budget)
    except MemoryBudgetError as error:
        decision.rewrite, decision.reason = False, str(error)
        return decision
    decision.flops_exact = flops.exact_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal)
    decision.flops_lowrank = flops.lowrank_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal, degree, chunk, kv_ratio)
    try:
        kv_heads = _example_size(math.prod(k_shape[:-2]))  # batch x key/value heads: the sweeps' problems
        decision.kernel = selector.choose(site.device or "meta", selector.compute_dtype(site_dtype(site)), degree,
                                         int(head_dim), _example_size(value_dim), kv_heads)
    except KernelUnavailableError as error:
        decision.rewrite, decision.reason = False, str(error)
        return decision
    if policy.cost_model:
        kept = _cost_model_keeps(decision, site, n_k, head_dim, value_dim, degree, chunk, batch_heads,
                                 polynomial_is_model=policy.on_inaccurate == "allow")
        if kept:
            decision.rewrite, decision.reason = False, kept
            return decision
    polynomial = decision.polynomial or polynomial_without_bound(degree, policy.approximation)
    decision.config = KernelConfig(decision.kernel.implementation, tuple(polynomial.coefficients), int(chunk),
                                   float(policy.max_error), policy.on_inaccurate, site_label(site))
    decision.lowrank_kwargs = dict(config=decision.config, memory_budget=policy.memory_budget)
    if site.masked_rows != "visible":
        if policy.context_parallel is not None:
            decision.rewrite, decision.reason = False, CONTEXT_PARALLEL_MASKED_ROWS
            return decision
        decision.lowrank_kwargs["masked_rows"] = site.masked_rows
    if policy.context_parallel is not None:
        decision.context_parallel = resolve_group(policy.context_parallel)
        # the group by name: a string is what an FX graph (and a functional collective) can hold
        decision.lowrank_kwargs["group"] = decision.context_parallel.name
    decision.algorithm = _algorithm(decision, site, n_q, n_k, head_dim, value_dim, kv_ratio, degree, chunk)
    if decision.algorithm == "direct":
        decision.flops_direct = flops.direct_flops(n_q, n_k, head_dim, value_dim, batch_heads, causal)
    return decision


def _algorithm(decision: Decision, site, n_q, n_k, head_dim, value_dim, kv_ratio, degree, chunk) -> str:
    """The algorithm a rewritten site's calls run, as the op asks lrcompile.ops.algorithm (the
    Triton kernels and the context-parallel exchange have only the factored one). Asked only of
    concrete lengths: on symbolic ones the answer would install a guard on them, which export,
    fixing the factored algorithm (lrcompile.compile.export), must not get."""
    if decision.kernel.implementation == "triton" or decision.context_parallel is not None:
        return "factored"
    if not all(isinstance(size, (int, float)) for size in (n_q, n_k, head_dim, value_dim, kv_ratio)):
        return ""
    groups = max(1, round(1 / kv_ratio))  # query heads per key/value head, as the op lays them out
    direct = algorithm.uses_direct(n_q, n_k, head_dim, value_dim, groups, degree, site.is_causal, chunk,
                                   site.device or "meta")
    return "direct" if direct else "factored"


def unmatched_patterns(policy: Policy, module_paths) -> list[str]:
    """The include/exclude patterns that match none of `module_paths` ('' is the root, matched as
    "<root>" like in `decide`): a misspelt path would otherwise select or drop nothing, silently."""
    paths = [path or "<root>" for path in module_paths]
    return [pattern for pattern in dict.fromkeys((*policy.include, *policy.exclude))
            if not any(fnmatch.fnmatchcase(path, pattern) for path in paths)]


FORCE_REWRITE = "Policy(cost_model=False), or --no-cost-model on the command line, forces the rewrite"


def _cost_model_keeps(decision: Decision, site, n_k, head_dim, value_dim, degree, chunk, batch_heads,
                      polynomial_is_model: bool = False) -> str:
    """Why the cost model keeps exact attention at this site; "" when low-rank is predicted faster.
    Records in decision.calibration which calibration decided (or why none applies).

    When the polynomial is the model (on_inaccurate="allow") it keeps nothing (docs/design.md section 3):
    exact softmax at short lengths, or on some devices, and P elsewhere would be two functions.
    The site is rewritten, and the op computes each call by the cheaper algorithm of the one
    function, directly when short (lrcompile.ops.algorithm), factored when long.
    """
    if polynomial_is_model:
        return ""
    device = getattr(site, "device", "") or "unknown"
    found = calibration.lookup(device, calibration.key_implementation(decision.kernel))
    decision.calibration = found.description
    if found.calibration is None:
        # on the CPU the torch path runs where the C kernels cannot: say why they cannot
        why = f" ({decision.kernel.reason})" if decision.kernel.reason else ""
        return (f"the cost model is not calibrated for this machine and kernel path ({decision.kernel.label}{why}): "
                f"{found.description}; so exact attention is kept: run `lrcompile calibrate`, or "
                f"{FORCE_REWRITE}")
    ratio = found.calibration.rate_ratio(site.is_causal, int(batch_heads))
    mask = "causal" if site.is_causal else "non-causal"
    shortest = found.calibration.shortest_crossover_for(site.is_causal)
    if not _holds(decision.flops_lowrank / ratio < decision.flops_exact):
        crossover = cost_model.crossover_length(int(head_dim), int(value_dim), site.is_causal, degree, chunk, ratio=ratio,
                                          shortest_crossover=shortest)
        return (f"exact attention is cheaper at n_k = {n_k} (low-rank pays off from about n = {crossover} for "
                f"d = {head_dim}, degree {degree}, {mask}, on {device}); {FORCE_REWRITE}")
    if _holds(n_k < shortest):
        return (f"key length {n_k} is below the shortest crossover measured on {device} for {mask} attention "
                f"(n = {shortest}), where the fixed cost of a call outweighs the FLOPs saved; {FORCE_REWRITE}")
    return ""


def _choose_degree(policy: Policy, score_range: float | None) -> Decision:
    approximation = policy.approximation
    if policy.degree == "auto":
        if score_range is None:
            return Decision(False, "degree='auto' needs a score range: set Policy(bound=...) or compile with real inputs")
        try:
            degree = degree_for(policy.tolerance, score_range, approximation)
        except ValueError as error:
            return Decision(False, f"score range {score_range:.3g} too wide: {error}")
        return Decision(True, degree=degree, polynomial=exp_polynomial(degree, score_range, approximation))
    degree = policy.degree
    if score_range is None:
        if not needs_bound(degree, approximation):
            return Decision(True, degree=degree)
        return Decision(False, f"{approximation} degree {degree} needs a score range to be used safely: set "
                               f"Policy(bound=...) or compile with real inputs")
    try:
        polynomial = exp_polynomial(degree, score_range, approximation)
    except NotPositiveError:
        return Decision(False, f"the {approximation} polynomial of degree {degree} is not positive on the "
                               f"score range [-{score_range:.3g}, {score_range:.3g}]")
    except ValueError as error:  # coefficients beyond float64 on very wide ranges
        return Decision(False, f"score range {score_range:.3g} too wide: {error}")
    if policy.tolerance is not None and polynomial.relative_error > policy.tolerance:
        return Decision(False, f"error bound {polynomial.relative_error:.2g} at score range {score_range:.3g} "
                               f"exceeds tolerance {policy.tolerance:g}")
    return Decision(True, degree=degree, polynomial=polynomial)


def site_label(site) -> str:
    """The name a site's counters have in lrcompile.stats(): "module.path:node"."""
    return f"{site.module_path or '<root>'}:{site.name}"


def _shapes(site):
    plan = site.replacement
    if plan is not None:
        shapes = (plan.q.shape(), plan.k.shape(), plan.v.shape())
        if None not in shapes:
            return shapes
    return site.query_shape, site.key_shape, site.value_shape


def site_dtype(site) -> torch.dtype:
    """The dtype of a site's query (float32 where the graph does not say)."""
    dtype = dtype_of(site.replacement.q.node) if site.replacement is not None else None
    return dtype if dtype is not None else torch.float32


def _example_size(size) -> int:
    """An int size, or a symbolic one's value on the example inputs, read without installing a
    guard: it only predicts which sweep runs, which each call decides again."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def _holds(condition) -> bool:
    """bool() of a size condition. On a torch.SymBool (dynamic shapes) bool() records a guard in
    the shape environment, so inputs on the other side of the threshold recompile."""
    return bool(condition)
