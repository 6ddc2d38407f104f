"""The kernels of the factored attention: one interface, three implementations, one selector.

Owns: the interface every implementation fills in (interface: forward, backward, `KernelConfig`),
what they share (operands: key centring, the ones column, key weights, the centring correction),
the implementations (reference: the torch sweep and direct algorithm; cpu: the C kernels, csrc/
and the per-head threads; triton: the Triton kernels and their ops), and which one runs a call
(selector, LRCOMPILE_KERNELS). May import lrcompile.math only. Entry point:
`lrcompile.kernels.selector.kernels_for`.
"""
