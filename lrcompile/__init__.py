"""lrcompile: sub-quadratic attention for any PyTorch model, as a torch.compile backend."""

from lrcompile.attention import lowrank_attention
from lrcompile.features import feature_dim
from lrcompile.polynomial import degree_for, exp_polynomial

__all__ = ["lowrank_attention", "feature_dim", "degree_for", "exp_polynomial"]
