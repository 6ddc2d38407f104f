"""The torch.compile backend: find attention sites, decide, rewrite them into the op.

Owns: the backend (backend), the user's Policy and per-site decisions (policy), the cost model
(cost_model) and its per-machine calibrations (calibration, machine, reference_calibration.json),
explain's report (report) and torch.export of the rewrite (export). May import lrcompile.ops,
lrcompile.kernels, lrcompile.math and passes. Entry point: `lrcompile.compile.backend.backend`.
"""
