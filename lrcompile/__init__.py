"""lrcompile: sub-quadratic attention for any PyTorch model, as a torch.compile backend.

    model = torch.compile(model, backend="lrcompile")                   # default policy
    model = torch.compile(model, backend=lrcompile.backend(lrcompile.Policy(degree=4)))
    print(lrcompile.explain(model, *example_inputs))                    # what is rewritten, and why
    lrcompile.stats()                                                   # per site: calls, fallbacks to exact
    out = lrcompile.lowrank_attention(q, k, v, is_causal=True)          # the op itself

The package is layered; each layer imports only the ones below it (import-linter contracts in
pyproject.toml, checked by `lint-imports` in CI):

    cli, demo        the command line and the main job
    bench            `lrcompile bench`, `lrcompile calibrate` and the benchmarks' shared parts
    compile          the backend, policy, cost model, calibration, explain, export
    ops              the SDPA-compatible op, its torch.library registrations, the accuracy guard
    kernels          one kernel interface; reference (torch), cpu (C), triton; the selector
    math             polynomials, feature maps, FLOP and byte counts, memory of the states

models.py (the built-in models) and reference.py (float64 references for tests) stand beside them.
"""

from lrcompile.compile.backend import RewriteCompileError, UnsupportedSiteError, backend
from lrcompile.compile.export import export, load
from lrcompile.compile.policy import Policy
from lrcompile.compile.report import Report, Site, explain
from lrcompile.math.features import feature_dim
from lrcompile.math.polynomial import degree_for, exp_polynomial
from lrcompile.ops.attention import lowrank_attention
from lrcompile.ops.context_parallel import ContextParallelError, context_parallel_attention
from lrcompile.ops.guard import InaccurateAttentionError, SiteStats, reset_stats, stats

__all__ = [
    "ContextParallelError", "InaccurateAttentionError", "Policy", "Report", "RewriteCompileError", "Site", "SiteStats",
    "UnsupportedSiteError", "backend", "context_parallel_attention", "degree_for", "exp_polynomial", "explain",
    "export", "feature_dim", "load", "lowrank_attention", "reset_stats", "stats",
]
