"""`lrcompile.export`: the rewrite for `torch.export`, as an ExportedProgram holding our custom ops.

    program = lrcompile.export(model, (x,), policy=lrcompile.Policy(cost_model=False))
    program.module()(x)          # runs lrcompile.factored_attention where the policy rewrote a site

`torch.export.export` traces to ATen operations without calling any torch.compile backend, so it
exports exact attention. Here Dynamo captures the model's graph at the level the attention passes
read (torch functions, as a backend sees them), the sites are decided and replaced exactly as the
backend does, and that rewritten graph is exported: `lrcompile.factored_attention` appears in the
program as one custom op per rewritten site (with the accuracy guard's arguments), and loading a
saved program needs `import lrcompile` to register it (`load` below does it and says so if an op
is missing: torch.export.load alone fails with a generic message, and torch gives a package no
hook to run before it is imported). The program holds the forward only, as
every ExportedProgram does; parameters keep Dynamo's names (`L__self___qkv_weight`).

With `dynamic_shapes`, every rewritten site runs the factored algorithm at every length: the
choice between it and the direct algorithm (lrcompile.ops.algorithm) is otherwise a guard on the lengths,
which a user's `Dim` range that spans the switch would violate.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from lrcompile.compile.backend import Rewrite, rewrite_graph
from lrcompile.compile.policy import Policy
from lrcompile.kernels.interface import KernelConfig
from passes import higher_order


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, policy: Policy | None = None,
           dynamic_shapes=None, on_rewrite=None) -> torch.export.ExportedProgram:
    """Export `model` called on (args, kwargs) with its attention sites rewritten per `policy`.

    `dynamic_shapes` is passed to both Dynamo's capture and `torch.export.export`. `on_rewrite`,
    if given, receives the `lrcompile.compile.backend.Rewrite` (the decisions and the graphs as code).
    """
    policy = Policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"export() takes an lrcompile.Policy, got {type(policy).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, as for torch.export.export, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    captured = torch._dynamo.export(model, dynamic_shapes=dynamic_shapes)(*args, **kwargs)
    flat_inputs = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    rewrite: Rewrite = rewrite_graph(captured.graph_module, flat_inputs, policy)
    if dynamic_shapes is not None:
        _fix_algorithm(rewrite.graph_module, "factored")
    if on_rewrite is not None:
        on_rewrite(rewrite)
    return torch.export.export(rewrite.graph_module, args, kwargs, dynamic_shapes=dynamic_shapes)


def _fix_algorithm(gm: torch.fx.GraphModule, algorithm: str) -> None:
    """Every rewritten site's KernelConfig with `algorithm` where it says "auto"."""
    for module in [gm, *(body.module for body in higher_order.all_bodies(gm))]:
        for node in module.graph.nodes:
            config = node.kwargs.get("config") if node.op == "call_function" else None
            if isinstance(config, KernelConfig) and config.algorithm == "auto":
                node.kwargs = {**node.kwargs, "config": config._replace(algorithm=algorithm)}
        module.recompile()


def load(f, **kwargs) -> torch.export.ExportedProgram:
    """torch.export.load(f, **kwargs) with lrcompile's ops registered (importing this module does
    it). A program that names an lrcompile op this version does not register fails with that said."""
    try:
        return torch.export.load(f, **kwargs)
    except RuntimeError as error:
        raise RuntimeError(
            f"lrcompile.load: could not load {f!r}: {error} If the program was exported by lrcompile, its "
            f"lrcompile ops must be registered when loading: `import lrcompile` (done here) registers those "
            f"of this version ({', '.join(sorted(_registered_ops()))})") from error


def _registered_ops() -> set[str]:
    import lrcompile.ops.factored_op  # noqa: F401 - registers lrcompile::factored_attention and its backward
    import lrcompile.ops.guard  # noqa: F401

    return {name for name in dir(torch.ops.lrcompile) if not name.startswith("_")}
