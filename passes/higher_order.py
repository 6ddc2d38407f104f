"""Graphs inside graphs: the bodies of the wrapping higher-order ops Dynamo emits.

Dynamo does not inline every region it traces. A block run through activation checkpointing
(`torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)`), a function passed to
`torch._higher_order_ops.wrap.wrap`, or a `torch.compiler.nested_compile_region` becomes one call
of a higher-order op whose first argument is a GraphModule attribute of the graph (the *body*);
the call's operands become the body's placeholders, in order:

    # Dynamo graph                                               # the body, self.wrap_body_0
    wrap_body_0 = self.wrap_body_0                               def forward(self, l_x_, l_bias_, ...):
    out = torch.ops.higher_order.tag_activation_checkpoint(          ...
        wrap_body_0, l_x_, l_bias_, ..., use_reentrant=False)        softmax = F.softmax(att_1, dim=-1)
    x = out[0]                                                       ...

This module owns which ops wrap a body and where their operands are (`WRAPPING_OPS`, a table),
listing a graph's bodies with the operands every call binds to their placeholders (`bodies`),
finding the module that holds a node (`module_holding`), passing one more value of an enclosing
graph into a body (`import_value`), and copying a GraphModule with its bodies
(`copy_graph_module`). Site finding (`attention_sites.py`) recurses through `bodies`; constants
(`constants.py`) look through a body's placeholders to what the calls pass.

Not listed, so never entered: control flow (`cond`, `while_loop`, `map`, `scan`), whose bodies
run a data-dependent number of times; `autograd_function_apply`, whose forward body has a
user-written backward that a rewrite of the forward would no longer match; `flex_attention`,
whose bodies are score and mask modifiers, not attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

higher_order = torch.ops.higher_order


@dataclass(frozen=True)
class WrappingOp:
    """A higher-order op that calls `args[body]` once on `args[operands:]`, kwargs being options."""

    target: Any
    body: int = 0
    operands: int = 1


# Read as: tag_activation_checkpoint(body, *operands, **checkpoint_options).
WRAPPING_OPS = (
    WrappingOp(higher_order.tag_activation_checkpoint),
    WrappingOp(higher_order.wrap_activation_checkpoint),
    WrappingOp(higher_order.wrap),
    WrappingOp(higher_order.invoke_subgraph, body=0, operands=2),  # (body, identifier, *operands)
)


def wrapping_op(node: Any) -> WrappingOp | None:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    for op in WRAPPING_OPS:
        if node.target is op.target:
            return op
    return None


@dataclass
class Body:
    """One body GraphModule of `owner` and every call of it (a nested_compile_region is called once per use)."""

    owner: torch.fx.GraphModule
    module: torch.fx.GraphModule
    attribute: str                                  # the first attribute it is fetched by, e.g. "wrap_body_0"
    calls: list[torch.fx.Node] = field(default_factory=list)

    def placeholders(self) -> list[torch.fx.Node]:
        return [node for node in self.module.graph.nodes if node.op == "placeholder"]

    def operands(self, call: torch.fx.Node) -> tuple:
        return tuple(call.args[wrapping_op(call).operands:])

    def bindings(self) -> dict[torch.fx.Node, list[Any]]:
        """Each placeholder -> what every call passes for it (values of the enclosing graph)."""
        per_call = [self.operands(call) for call in self.calls]
        return {placeholder: [operands[index] for operands in per_call]
                for index, placeholder in enumerate(self.placeholders())
                if all(index < len(operands) for operands in per_call)}


def bodies(gm: torch.fx.GraphModule) -> list[Body]:
    """The bodies called by wrapping ops in `gm`'s own graph (not nested ones), in order of first call.

        >>> [(body.attribute, len(body.calls)) for body in bodies(gm)]    # two checkpointed blocks
        [('wrap_body_0', 1), ('wrap_body_1', 1)]
    """
    found: dict[int, Body] = {}
    for node in gm.graph.nodes:
        op = wrapping_op(node)
        if op is None or len(node.args) <= op.body:
            continue
        fetch = node.args[op.body]
        if not (isinstance(fetch, torch.fx.Node) and fetch.op == "get_attr"):
            continue
        module = _fetch_attr(gm, fetch.target)
        if not isinstance(module, torch.fx.GraphModule):
            continue
        body = found.setdefault(id(module), Body(gm, module, fetch.target))
        body.calls.append(node)
    return list(found.values())


def all_bodies(gm: torch.fx.GraphModule) -> list[Body]:
    """`bodies(gm)`, and theirs, recursively (outer bodies first)."""
    result = []
    for body in bodies(gm):
        result.append(body)
        result.extend(all_bodies(body.module))
    return result


def module_holding(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.GraphModule | None:
    """The GraphModule whose graph holds `node`: gm itself or one of its bodies; None if neither."""
    if node.graph is gm.graph:
        return gm
    for body in all_bodies(gm):
        if node.graph is body.module.graph:
            return body.module
    return None


def import_value(gm: torch.fx.GraphModule, graph: torch.fx.Graph, value: Any) -> Any:
    """`value`, a node of a graph enclosing `graph` (both within gm), made available inside `graph`.

    Every call of each body on the way in gets `value` as one more operand and the body one more
    placeholder; a value that is not a node is returned as is.

        # before                                           # after import_value(gm, body.graph, mask)
        ckpt = tag_activation_checkpoint(wrap_body_0, x)   ckpt = tag_activation_checkpoint(wrap_body_0, x, mask)
        def forward(self, l_x_): ...                       def forward(self, l_x_, mask): ...
    """
    if not isinstance(value, torch.fx.Node) or value.graph is graph:
        return value
    chain = _chain_to(gm, graph)
    if chain is None:
        raise ValueError(f"graph does not belong to {type(gm).__name__}'s bodies; cannot import {value.name!r}")
    start = next((index for index, body in enumerate(chain) if body.owner.graph is value.graph), None)
    if start is None:
        raise ValueError(f"{value.name!r} is not in a graph enclosing the body it is imported into")
    for body in chain[start:]:
        value = _add_operand(body, value)
    return value


def _chain_to(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> list[Body] | None:
    """The bodies entered, outermost first, from gm down to the one whose graph is `graph`."""
    for body in bodies(gm):
        if body.module.graph is graph:
            return [body]
        inner = _chain_to(body.module, graph)
        if inner is not None:
            return [body, *inner]
    return None


def _add_operand(body: Body, value: torch.fx.Node) -> torch.fx.Node:
    for call in body.calls:
        if value.graph is not call.graph:
            raise ValueError(f"{value.name!r} is not in the graph calling {body.attribute}")
    # A value already passed by every call needs no new operand.
    for placeholder, passed in body.bindings().items():
        if all(operand is value for operand in passed):
            return placeholder
    graph = body.module.graph
    placeholders = body.placeholders()
    anchor = placeholders[-1] if placeholders else None
    context = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None)
    with context:
        placeholder = graph.placeholder(_fresh_name(graph, value.name))
    placeholder.meta.update({key: value.meta[key] for key in ("example_value", "val", "tensor_meta")
                             if key in value.meta})
    for call in body.calls:
        call.args = (*call.args, value)
    graph.lint()
    body.module.recompile()
    body.owner.graph.lint()
    body.owner.recompile()
    return placeholder


def _fresh_name(graph: torch.fx.Graph, base: str) -> str:
    taken = {node.name for node in graph.nodes}
    name, index = base, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    return name


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of gm's graph, and of every body graph, over the same parameters.

    torch.fx.GraphModule(gm, graph) shares the body GraphModules it finds as attributes, so a
    rewrite inside a copied body would change the original's. Bodies are copied once each, so a
    body shared by several calls (nested_compile_region) stays shared in the copy.

        >>> copy = copy_graph_module(gm)
        >>> copy.wrap_body_0 is gm.wrap_body_0, copy.wrap_body_0.graph is gm.wrap_body_0.graph
        (False, False)
    """
    return _copy(gm, {})


def _copy(gm: torch.fx.GraphModule, copied: dict[int, torch.fx.GraphModule]) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    graph._codegen = gm.graph._codegen
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    for body in bodies(gm):
        if id(body.module) not in copied:
            copied[id(body.module)] = _copy(body.module, copied)
        for call in body.calls:
            fetch = call.args[wrapping_op(call).body]
            _set_attr(copy, fetch.target, copied[id(body.module)])
    return copy


def _fetch_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _set_attr(module: torch.nn.Module, target: str, value: Any) -> None:
    *path, name = target.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, name, value)


def code_with_bodies(gm: torch.fx.GraphModule) -> str:
    """gm's code followed by each body's, under a `# body <attribute>` header."""
    parts = [gm.code]
    for body in bodies(gm):
        parts.append(f"# body {body.attribute}\n{code_with_bodies(body.module)}")
    return "\n".join(parts)
