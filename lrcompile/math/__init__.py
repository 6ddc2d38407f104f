"""The mathematics of the polynomial attention, as functions of shapes and tensors.

Owns: the polynomials that replace exp and their error bounds (polynomial), the monomial feature
maps in torch (features), FLOP and byte counts (flops), the bytes of the feature states
(memory_budget). Imports nothing of lrcompile: the bottom layer. Entry point:
`lrcompile.math.polynomial.exp_polynomial`.
"""
