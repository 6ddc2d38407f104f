"""The torch.compile backend: find attention sites, decide per site, rewrite, hand to Inductor.

    model = torch.compile(model, backend="lrcompile")                 # default Policy()
    model = torch.compile(model, backend=lrcompile.backend(policy))
    model = torch.compile(model, backend="lrcompile", mode="max-autotune")  # mode / options go to Inductor

Dynamo hands us its FX graph and the example inputs. We copy the graph, find the sites
(`passes.find_attention_sites`), measure their score ranges on the example inputs when the policy
needs them, decide (`lrcompile.compile.policy.decide`), replace the chosen sites with
`lrcompile.lowrank_attention` (`passes.replace_attention_site`) and give the result to
`torch._inductor.compile_fx.compile_fx`. Our rewrite runs on the Dynamo graph, before Inductor's
own attention fusion, which would otherwise turn explicit softmax spellings into exact SDPA.
`lowrank_attention` is an autograd.Function, so AOTAutograd traces its explicit backward and
Inductor compiles both the factored forward and the factored backward.

If anything in our part fails, the original graph is compiled instead, with a warning naming the
site: a training run never dies because of this backend (unless Policy(on_unsupported="error")
asks for exactly that).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
import torch._dynamo.exc
import torch.fx
from torch._subclasses.fake_tensor import is_fake

from lrcompile.compile.policy import Decision, Policy, decide, site_label, unmatched_patterns
from lrcompile.ops import guard
from lrcompile.ops.attention import lowrank_attention, measured_score_range
from lrcompile.ops.context_parallel import check_context_parallel_sites, context_parallel_attention
from passes import AttentionSite, find_attention_sites, higher_order, replace_attention_site
from passes.graph_walk import module_paths


class UnsupportedSiteError(RuntimeError):
    """Raised under Policy(on_unsupported="error") for a site that cannot be rewritten."""


class RewriteCompileError(RuntimeError):
    """Raised under Policy(on_inaccurate="error") when the graph with rewritten sites fails to compile:
    keeping them exact would silently give up what the policy asked for."""


# Not failures: the user's explicit choice, and Dynamo's own control flow (it raises these from
# inside compilation to re-trace the frame; swallowing them would break the restart).
_MUST_PROPAGATE = (UnsupportedSiteError, torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame)


@dataclass
class Rewrite:
    """What the backend did to one Dynamo graph."""

    graph_module: torch.fx.GraphModule  # the rewritten copy (the original is left untouched)
    decisions: list[tuple[AttentionSite, Decision]] = field(default_factory=list)
    code_before: str = ""
    code_after: str = ""
    module_paths: set[str] = field(default_factory=set)  # every module the graph was traced through

    @property
    def rewritten(self) -> list[AttentionSite]:
        return [site for site, decision in self.decisions if decision.rewrite]


def backend(policy: Policy | None = None):
    """A torch.compile backend applying `policy` (default: Policy())."""
    policy = Policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"backend() takes an lrcompile.Policy, got {type(policy).__name__}")

    seen_paths: dict[str, None] = {}  # attention sites' paths first: the likeliest targets of a pattern
    warned: set[str] = set()

    def warn_unmatched(result: Rewrite):
        # Over every graph this backend compiled so far: a graph break may put a module in a later graph.
        seen_paths.update(dict.fromkeys(site.module_path for site, _ in result.decisions))
        seen_paths.update(dict.fromkeys(sorted(result.module_paths, key=lambda path: (path.count("."), path))))
        for pattern in unmatched_patterns(policy, seen_paths):
            if pattern not in warned:
                warned.add(pattern)
                warnings.warn(f"lrcompile: {unmatched_message(pattern, policy, list(seen_paths))}", stacklevel=2)

    def lrcompile(gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
        return compile_graph(gm, example_inputs, policy, on_rewrite=warn_unmatched,
                             config_patches=inductor_config_patches(mode, options))

    return lrcompile


def unmatched_message(pattern: str, policy: Policy, paths: list[str]) -> str:
    which = "include" if pattern in policy.include else "exclude"
    shown = ", ".join(repr(path or "<root>") for path in paths[:5])
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return (f"{which} pattern {pattern!r} matches no module of the compiled model, so it selects nothing "
            f"(module paths, as model.named_modules() names them: {shown}{more})")


def lrcompile_backend(gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
    """The backend registered as torch.compile(backend="lrcompile"): the default policy."""
    return compile_graph(gm, example_inputs, Policy(), config_patches=inductor_config_patches(mode, options))


def inductor_config_patches(mode: str | None = None, options: dict | None = None) -> dict:
    """The Inductor config that torch.compile's `mode` and `options` stand for, read as its own
    "inductor" backend reads them: torch.compile passes both to a named backend, and Inductor
    is where they take effect."""
    patches = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))  # raises on an unknown mode, naming the known ones
    if options:
        from torch._inductor import config

        known = config.get_config_copy()
        for key, value in options.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown Inductor option {key!r} in torch.compile(options=...); known options "
                                 f"are the names in torch._inductor.config, e.g. {sorted(known)[:5]}")
            patches[name] = value
    return patches


def compile_graph(gm, example_inputs, policy: Policy, inner=None, on_rewrite=None, config_patches=None):
    """Rewrite `gm` per `policy` and compile it with `inner` (default: Inductor's compile_fx, with
    `config_patches`)."""
    if inner is None:
        from torch._inductor.compile_fx import compile_fx as inner

        if config_patches:
            inner = functools.partial(inner, config_patches=config_patches)
    # Under context parallelism the original graph is no fallback: its attention would see only
    # this rank's slice of the sequence, a different function. Failures propagate instead.
    sharded = policy.context_parallel is not None
    try:
        result = rewrite_graph(gm, example_inputs, policy)
    except _MUST_PROPAGATE:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of ours falls back to the original graph
        if sharded:
            raise
        warnings.warn(f"lrcompile: rewriting failed ({type(error).__name__}: {error}); compiling the graph of "
                      f"{_modules_of(gm)} unchanged: its attention stays exact", stacklevel=2)
        return inner(gm, example_inputs)
    if on_rewrite is not None:
        on_rewrite(result)
    if not result.rewritten:
        return inner(gm, example_inputs)
    try:
        return inner(result.graph_module, example_inputs)
    except _MUST_PROPAGATE:
        raise
    except Exception as error:  # noqa: BLE001
        if sharded:
            raise
        # Not a warning only: stats() counts it per site, explain() shows the site kept with the error,
        # and a policy that raises on inaccurate sites raises here too.
        message = record_compile_failure(result, error)
        if policy.on_inaccurate == "error":
            raise RewriteCompileError(message) from error
        warnings.warn(message, stacklevel=2)
        return inner(gm, example_inputs)


def record_compile_failure(result: Rewrite, error: BaseException) -> str:
    """Count the failure in stats() for every rewritten site of `result`; the message to show."""
    described = f"{type(error).__name__}: {error}"
    for site in result.rewritten:
        guard.record_compile_failure(site_label(site), described)
    names = ", ".join(f"{site.name} ({site.module_path or 'root'})" for site in result.rewritten)
    return f"lrcompile: compiling the rewritten graph failed ({described}); sites {names} stay exact attention"


def _modules_of(gm: torch.fx.GraphModule) -> str:
    """The innermost modules a graph was traced through, for a message about the whole graph."""
    try:
        paths = sorted(module_paths(gm.graph))
    except Exception:  # noqa: BLE001 - a message must not fail where the rewrite already did
        return "this graph"
    leaves = [path for path in paths if path and not any(other.startswith(path + ".") for other in paths)]
    shown = ", ".join(leaves[:6]) + (f" and {len(leaves) - 6} more" if len(leaves) > 6 else "")
    return f"modules {shown}" if leaves else "the root module"


def rewrite_graph(gm: torch.fx.GraphModule, example_inputs, policy: Policy, measure: bool | None = None) -> Rewrite:
    """Find, decide and replace on a copy of `gm`. `measure`: measure score ranges on the example
    inputs (default: when the policy's decisions depend on them)."""
    working = copy_graph_module(gm)
    sites = find_attention_sites(working)
    paths = set().union(module_paths(gm.graph), *(module_paths(body.module.graph) for body in higher_order.all_bodies(gm)))
    result = Rewrite(working, code_before=higher_order.code_with_bodies(gm), module_paths=paths)
    if not sites:
        result.code_after = higher_order.code_with_bodies(working)
        return result
    if measure is None:
        measure = policy.needs_score_range and policy.bound is None
    ranges = score_ranges(gm, example_inputs) if measure else {}
    for site in sites:
        decision = decide(site, policy, ranges.get(site.name))
        result.decisions.append((site, decision))
        if not decision.rewrite and not site.supported:
            _on_unsupported(site, policy)
    if policy.context_parallel is not None:
        check_context_parallel_sites(result.decisions)
    for site, decision in result.decisions:
        if decision.rewrite:
            attention = context_parallel_attention if decision.context_parallel is not None else lowrank_attention
            try:
                replace_attention_site(working, site, attention, **decision.lowrank_kwargs)
            except Exception as error:
                raise RuntimeError(f"replacing site {site.name} ({site.module_path or 'root'}) failed: {error}") from error
    result.code_after = higher_order.code_with_bodies(working)
    return result


# Sites already warned about under on_unsupported="warn", per policy object: a recompile (a new
# shape, automatic dynamic) finds the same sites again, and warning again would say nothing new.
_WARNED_UNSUPPORTED: set[tuple[int, str, str, str]] = set()


def _on_unsupported(site: AttentionSite, policy: Policy):
    message = f"attention site {site.name} in {site.module_path or 'the root module'} kept exact: {site.reason}"
    if policy.on_unsupported == "error":
        raise UnsupportedSiteError(message)
    key = (id(policy), site.module_path, site.name, site.reason)
    if policy.on_unsupported == "warn" and key not in _WARNED_UNSUPPORTED:
        _WARNED_UNSUPPORTED.add(key)
        warnings.warn(f"lrcompile: {message} (warned once per site)", stacklevel=3)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of gm's graph over the same parameters and buffers; the bodies of
    checkpointed blocks are copied too, so rewriting the copy never changes gm (compiled on fallback)."""
    return higher_order.copy_graph_module(gm)


def score_ranges(gm: torch.fx.GraphModule, example_inputs) -> dict[str, float]:
    """Each supported site's largest |score| on the example inputs (see measured_score_range).

    Runs a copy of the graph once, in which every site is replaced by a probe that records the
    range and returns exact attention. Inputs are cloned so in-place updates in the graph (buffers)
    do not touch the model. Returns {} when the inputs are not real tensors.
    """
    if any(isinstance(x, torch.Tensor) and is_fake(x) for x in example_inputs):
        return {}
    probe = copy_graph_module(gm)
    for site in find_attention_sites(probe):
        if site.supported:
            replace_attention_site(probe, site, _range_probe, site_name=site.name)
    inputs = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]
    _PROBED.clear()
    with torch.no_grad():
        torch.fx.Interpreter(probe).run(*inputs)
    ranges = dict(_PROBED)
    _PROBED.clear()
    return ranges


_PROBED: dict[str, float] = {}


def _range_probe(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, site_name):
    _PROBED[site_name] = max(_PROBED.get(site_name, 0.0),
                             measured_score_range(q, k, v, attn_mask, is_causal, scale, enable_gqa))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
