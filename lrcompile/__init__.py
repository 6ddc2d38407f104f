"""lrcompile: sub-quadratic attention for any PyTorch model, as a torch.compile backend.

    model = torch.compile(model, backend="lrcompile")                   # default policy
    model = torch.compile(model, backend=lrcompile.backend(lrcompile.Policy(degree=4)))
    print(lrcompile.explain(model, *example_inputs))                    # what is rewritten, and why
    lrcompile.stats()                                                   # per site: calls, fallbacks to exact
    out = lrcompile.lowrank_attention(q, k, v, is_causal=True)          # the op itself
"""

from lrcompile.attention import lowrank_attention
from lrcompile.compiler import UnsupportedSiteError, backend
from lrcompile.export import export, load
from lrcompile.features import feature_dim
from lrcompile.guard import InaccurateAttentionError, SiteStats, reset_stats, stats
from lrcompile.policy import Policy
from lrcompile.polynomial import degree_for, exp_polynomial
from lrcompile.report import Report, Site, explain

__all__ = [
    "InaccurateAttentionError", "Policy", "Report", "Site", "SiteStats", "UnsupportedSiteError", "backend",
    "degree_for", "exp_polynomial", "explain", "export", "feature_dim", "load", "lowrank_attention", "reset_stats", "stats",
]
