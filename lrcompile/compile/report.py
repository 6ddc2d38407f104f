"""`explain`: what the backend finds and does in a model, as a `Report` a person can read.

    report = lrcompile.explain(model, *example_args, policy=policy, **example_kwargs)
    print(report)          # one row per attention site
    report.sites           # list[Site]
    report.graphs          # {"dynamo_before": [...], "dynamo_after": [...], "aot_forward": [...], "aot_backward": [...]}

It compiles the model with a recording backend and runs one forward pass on the example inputs
(Dynamo needs it to trace). Score ranges are measured on those inputs. AOTAutograd's forward and
backward graphs are recorded when the joint graph is partitioned, so no backward pass, and no
training step, is run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lrcompile.compile.backend import Rewrite, copy_graph_module, record_compile_failure, rewrite_graph
from lrcompile.compile.policy import Policy, site_dtype, site_label, unmatched_patterns
from lrcompile.ops import guard
from lrcompile.ops.context_parallel import describe


@dataclass
class Site:
    """One attention site as the report shows it."""

    module: str                 # module path, e.g. "transformer.h.0.attn" ("<root>" for the model itself)
    rewritten: bool
    reason: str                 # why kept; "" when rewritten
    mask: str                   # passes.masks.KINDS: none | causal | key_padding | causal+key_padding |
                                # key_bias | causal+key_bias | general
    degree: int | None
    feature_dim: int | None     # r = C(d + g, g)
    spelling: str = ""          # sdpa | matmul+softmax | einsum+softmax | ...
    query_shape: tuple = ()
    key_shape: tuple = ()
    value_shape: tuple = ()
    score_range: float | None = None      # largest |score| measured on the example inputs
    error_bound: float | None = None      # bound on |out - exact| / max|v| at that range
    flops_exact: float | None = None      # forward + backward
    flops_lowrank: float | None = None    # of `algorithm` where it is known; else of the factored algorithm
    algorithm: str = ""                   # "direct" | "factored": which algorithm of the polynomial attention
                                          # the op runs at this shape (lrcompile.ops.algorithm); "" when kept,
                                          # or decided per call (symbolic lengths)
    notes: str = ""
    label: str = ""                       # "module:node", the key of lrcompile.stats()
    measured_error: float | None = None   # the guard's metric (lrcompile.ops.guard) on the example inputs, every row
    guard_falls_back: bool | None = None  # the guard's estimate on those inputs exceeds max_error, so
                                          # a call like it returns exact under on_inaccurate="exact"
    implementation: str = ""              # what runs a rewritten site's calls (lrcompile.kernels.selector): "c",
                                          # "triton", "torch" or "c features, torch sweep"; "" when kept
    calibration: str = ""                 # which cost-model calibration decided, or why none applies
    context_parallel: str = ""            # the collectives a sharded site runs (lrcompile.ops.context_parallel);
                                          # "" when the policy has no context_parallel group


@dataclass
class Report:
    sites: list[Site] = field(default_factory=list)
    graphs: dict[str, list[str]] = field(default_factory=lambda: {
        "dynamo_before": [], "dynamo_after": [], "aot_forward": [], "aot_backward": []})
    policy: Policy | None = None
    unmatched_patterns: list[str] = field(default_factory=list)  # include/exclude patterns matching no module
    graph_breaks: list[str] = field(default_factory=list)  # why Dynamo broke a graph or skipped a frame while
                                                           # explain ran: that code ran eagerly, unseen by the backend

    def __str__(self) -> str:
        return format_report(self)

    def graph_code(self) -> str:
        """Every recorded graph as code, with headers."""
        titles = {"dynamo_before": "Dynamo graph, before rewriting", "dynamo_after": "Dynamo graph, after rewriting",
                  "aot_forward": "AOTAutograd forward graph (what Inductor compiles)",
                  "aot_backward": "AOTAutograd backward graph (what Inductor compiles)"}
        parts = []
        for key, title in titles.items():
            for index, code in enumerate(self.graphs[key]):
                parts.append(f"# ==== {title}, graph {index} ====\n{code.strip()}\n")
        return "\n".join(parts)


def explain(model, *args, policy: Policy | None = None, **kwargs) -> Report:
    """Compile `model` with a recording backend, run it once on the example inputs, return the Report."""
    policy = Policy() if policy is None else policy
    report = Report(policy=policy)
    paths: set[str] = set()

    def recording_backend(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified
        from torch._functorch.partitioners import default_partition

        rewrite = rewrite_graph(gm, example_inputs, policy, measure=True)
        report.sites.extend(_sites_of(rewrite, _compile_error(rewrite, example_inputs)))
        paths.update(rewrite.module_paths)
        report.graphs["dynamo_before"].append(rewrite.code_before)
        report.graphs["dynamo_after"].append(rewrite.code_after)

        def partition(joint, joint_inputs, **partition_kwargs):
            forward, backward = default_partition(joint, joint_inputs, **partition_kwargs)
            report.graphs["aot_forward"].append(forward.code)
            report.graphs["aot_backward"].append(backward.code)
            return forward, backward

        def keep_forward_only(graph, _inputs):  # inference graphs: no partition happens
            if not report.graphs["aot_forward"] or report.graphs["aot_forward"][-1] != graph.code:
                report.graphs["aot_forward"].append(graph.code)
            return graph.forward

        return aot_module_simplified(rewrite.graph_module, example_inputs, fw_compiler=keep_forward_only,
                                     bw_compiler=lambda graph, _inputs: graph.forward, partition_fn=partition)

    compiled = torch.compile(model, backend=recording_backend, dynamic=False)
    breaks_before = _graph_break_counts()
    with guard.measuring() as measured:
        compiled(*args, **kwargs)
    breaks_after = _graph_break_counts()
    report.graph_breaks = [reason for reason in breaks_after if breaks_after[reason] > breaks_before.get(reason, 0)]
    for site in report.sites:
        if site.label in measured:
            site.measured_error = measured[site.label].measured_error
            site.guard_falls_back = measured[site.label].would_fall_back
    report.unmatched_patterns = unmatched_patterns(policy, paths)
    return report


def _graph_break_counts() -> dict[str, int]:
    """Dynamo's count of each graph-break message so far in this process (its own statistics)."""
    from torch._dynamo.utils import counters

    return dict(counters.get("graph_break", {}))


def _graph_break_summary(message: str) -> str:
    """Dynamo's message cut to what a reader acts on: the first line, and its hint if it gives one."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    hints = [line for line in lines[1:] if line.startswith("Hint:")]
    return "; ".join(lines[:1] + hints[:1]) if lines else message


def _graph_break_lines(report: Report) -> list[str]:
    if not report.graph_breaks:
        return []
    found = "no attention site reached them" if not report.sites else "attention there was not seen"
    return [f"Dynamo broke or skipped {len(report.graph_breaks)} part(s) of the model, which then ran eagerly, "
            f"outside the graphs lrcompile rewrites ({found}); torch's reasons:",
            *[f"  - {_graph_break_summary(reason)}" for reason in report.graph_breaks]]


# Implementations whose kernels Inductor itself compiles into the graph (a triton_op is decomposed
# into its kernels), so that a rewritten graph can fail to compile where the op alone runs: explain
# compiles such graphs with Inductor too, as the backend would.
COMPILE_CHECKED_IMPLEMENTATIONS = ("triton",)


def _compile_error(rewrite: Rewrite, example_inputs) -> str | None:
    """The message of a failed Inductor compile of the rewritten graph (counted in stats()), or None."""
    implementations = {decision.kernel.implementation for _, decision in rewrite.decisions
                       if decision.rewrite and decision.kernel is not None}
    if not implementations & set(COMPILE_CHECKED_IMPLEMENTATIONS):
        return None
    try:
        _inductor_compile(copy_graph_module(rewrite.graph_module), example_inputs)
    except Exception as error:  # noqa: BLE001 - reported, as the backend would keep the sites exact
        return record_compile_failure(rewrite, error)
    return None


def _inductor_compile(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _sites_of(rewrite: Rewrite, compile_error: str | None = None) -> list[Site]:
    sites = []
    for site, decision in rewrite.decisions:
        polynomial = decision.polynomial  # set by decide() whenever a score range is known
        sites.append(Site(
            module=site.module_path or "<root>",
            rewritten=decision.rewrite and compile_error is None,
            reason=decision.reason if compile_error is None or not decision.rewrite else compile_error,
            mask=site.mask,
            degree=decision.degree,
            feature_dim=decision.feature_dim,
            spelling=site.spelling,
            query_shape=tuple(site.query_shape),
            key_shape=tuple(site.key_shape),
            value_shape=tuple(site.value_shape),
            score_range=decision.score_range,
            error_bound=polynomial.output_error_factor if polynomial is not None else None,
            flops_exact=_number(decision.flops_exact),
            flops_lowrank=_number(decision.flops_direct if decision.algorithm == "direct" else decision.flops_lowrank),
            algorithm=decision.algorithm if decision.rewrite and compile_error is None else "",
            notes=site.notes,
            label=site_label(site),
            implementation=(decision.kernel.label if decision.rewrite and decision.kernel is not None
                            and compile_error is None else ""),
            calibration=decision.calibration,
            context_parallel=(describe(decision.context_parallel, site, decision.degree, site_dtype(site))
                              if decision.rewrite and decision.context_parallel else ""),
        ))
    return sites


def _number(value):
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # symbolic


def format_report(report: Report) -> str:
    include = report.policy.include if report.policy is not None else ()
    unmatched = [f"{'include' if pattern in include else 'exclude'} pattern {pattern!r} matches no module path of "
                 f"the model (paths as model.named_modules() names them); it selects nothing"
                 for pattern in report.unmatched_patterns]
    breaks = _graph_break_lines(report)
    if not report.sites and breaks:
        return "\n".join(["lrcompile: no softmax-attention site reached the compiled graphs. That does not mean the "
                          "model has none:", *breaks, *unmatched])
    if not report.sites:
        return "\n".join(["lrcompile: no softmax-attention site found in this model (nothing to rewrite).",
                          *unmatched])
    header = ("module", "spelling", "q shape", "k shape", "mask", "decision", "implementation", "degree", "r",
              "score range", "error bound", "measured error", "GFLOP exact", "GFLOP low-rank")
    rows = []
    for s in report.sites:
        rows.append((
            s.module, s.spelling, _shape(s.query_shape), _shape(s.key_shape), s.mask,
            _decision(s),
            s.implementation or "-",
            str(s.degree) if s.degree is not None else "-",
            str(s.feature_dim) if s.feature_dim is not None else "-",
            f"{s.score_range:.3g}" if s.score_range is not None else "-",
            _bound(s.error_bound),
            f"{s.measured_error:.2g}" if s.measured_error is not None else "-",
            _gflop(s.flops_exact), " ".join(filter(None, (_gflop(s.flops_lowrank), s.algorithm))),
        ))
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
    rewritten = sum(s.rewritten for s in report.sites)
    out = [f"lrcompile: {len(report.sites)} attention site(s), {rewritten} rewritten, "
           f"{len(report.sites) - rewritten} kept exact", line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    guarded = [s.module for s in report.sites if s.guard_falls_back]
    if guarded:
        out.append("")
        out.append(f"the accuracy guard's estimate exceeds max_error={report.policy.max_error:g} on these inputs "
                   f"(so calls like them act by on_inaccurate={report.policy.on_inaccurate!r}): {', '.join(guarded)}")
    if unmatched:
        out += ["", *unmatched]
    if breaks:
        out += ["", *breaks]
    kept = [(s.module, s.reason) for s in report.sites if not s.rewritten]
    if kept:
        out.append("")
        out.append("kept exact, and why:")
        out += [f"  {module}: {reason}" for module, reason in kept]
    calibrations = list(dict.fromkeys(s.calibration for s in report.sites if s.calibration))
    if calibrations:
        out.append("")
        out += [f"cost model: {description}" for description in calibrations]
    sharded = [(s.module, s.context_parallel) for s in report.sites if s.context_parallel]
    if sharded:
        out.append("")
        out.append("context parallelism (the sequence sharded over the group; these collectives are functional "
                   "collectives in the compiled forward and backward graphs):")
        out += [f"  {module}: {collectives}" for module, collectives in sharded]
        out.append("  outside the compiled graphs: the check that every rank rewrote the same sites, one all-gather "
                   "per graph at compile time")
    notes = [(s.module, s.notes) for s in report.sites if s.notes]
    if notes:
        out.append("")
        out.append("notes:")
        out += [f"  {module}: {note}" for module, note in notes]
    out.append("")
    out.append("score range: largest |s q.k| measured on the example inputs (keys centred when non-causal); "
               "error bound: max |out - exact| / max |v| implied by the polynomial's relative error on that "
               "range; measured error: the accuracy guard's metric, max over rows of "
               "||out_i - exact_i|| / rms_j ||out_j|| per head, measured on the example inputs, every row; "
               "implementation: the kernels a rewritten site runs (LRCOMPILE_KERNELS forces one); "
               "GFLOP: forward + backward, whole call; low-rank: of the algorithm the op runs at this shape, "
               "named beside it (direct: the n x n polynomial block, at short lengths; factored: the feature "
               "states; lrcompile.ops.algorithm), of the factored one for a kept site.")
    return "\n".join(out)


def _decision(site: Site) -> str:
    if not site.rewritten:
        return "kept exact"
    return "REWRITTEN (guard: exact)" if site.guard_falls_back else "REWRITTEN"


def _shape(shape):
    return "(" + ", ".join(str(x) for x in shape) + ")"


def _bound(value):
    if value is None:
        return "-"
    return "none (>= 1)" if math.isinf(value) else f"{value:.2g}"


def _gflop(value):
    return "-" if value is None else f"{value / 1e9:.3g}"
