"""The kernel interface: what every implementation of the factored attention fills in.

Three implementations compute one function (the formulas in `lrcompile.kernels.reference`), forward
and backward, with the same arguments:

    reference   lrcompile.kernels.reference   the torch sweep and the torch direct algorithm
    cpu         lrcompile.kernels.cpu         the C kernels (csrc/), CPU float32/float64
    triton      lrcompile.kernels.triton      the Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)

`lrcompile.kernels.selector.kernels_for(implementation)` returns the one a `KernelConfig` names.
What they share (key centring, the ones column of V^, the key weights, the centring's gradient
correction) is `lrcompile.kernels.operands`, below all three.

Inputs are in the kernel layout that `lrcompile.ops.attention` normalises every call to, in the
compute dtype (float32 or float64): q (B, H, G, n_q, d), k (B, H, n_k, d), v (B, H, n_k, d_v),
key_weight (B, H, n_k) or None; `scale` >= 0 (a negative scale is carried by the keys).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


# A NamedTuple rather than a frozen dataclass: the rewritten FX graph holds it as an argument of
# the lowrank_attention call, and FX writes NamedTuples (only) back as code that rebuilds them.
class KernelConfig(NamedTuple):
    """What the kernel of one site (or one eager call) runs with, decided once.

    Built by `lrcompile.compile.policy.decide` for a rewritten site and by `lowrank_attention` for a
    direct call. The scale and causality are the call's own arguments (SDPA's), not repeated here.
    """

    implementation: str                 # "c" | "triton" | "torch" (lrcompile.kernels.selector)
    coefficients: tuple[float, ...]     # c_0..c_g of the polynomial P that replaces exp
    chunk_size: int                     # rows per chunk of the sweeps (and causal in-chunk block)
    max_error: float = 0.01             # the accuracy guard (lrcompile.ops.guard)
    on_inaccurate: str = "allow"
    site_label: str = "lowrank_attention"
    algorithm: str = "auto"             # "auto" (lrcompile.ops.algorithm's cost rule per call) | "direct" | "factored"

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1


class Kernels(Protocol):
    """One implementation: the forward and the explicit backward of the factored attention.

    `direct` asks for the direct algorithm (the n x n block without features, for short calls;
    the caller decides, `lrcompile.ops.algorithm`); where it is True there is no state (0 rows).
    An implementation without a direct algorithm runs the factored one, and says so by its state.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weight: torch.Tensor | None,
                config: KernelConfig, scale: float, causal: bool, direct: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out (B, H, G, n_q, d_v), denominator (B, H, G, n_q), state (B, H, rows, d_v + 1))."""

    def backward(self, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_weight: torch.Tensor | None, out: torch.Tensor, denominator: torch.Tensor, state: torch.Tensor,
                 config: KernelConfig, scale: float, causal: bool, direct: bool, key_weight_grad: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv, d key_weight) for what `forward` returned; the last is empty unless key_weight_grad."""
