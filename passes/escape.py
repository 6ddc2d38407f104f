"""Escape analysis: may a matched attention subgraph be replaced by one fused call?

Replacing a site removes every node of its matched subgraph and keeps only the value of its
output. That is exact only when nothing else reads an intermediate value (the scores, the masked
scores, the softmax weights) and the subgraph is convex: no path leaves it and comes back in,
which would make the fused call depend on its own result.

    scores = q @ k.mT * s                       scores = q @ k.mT * s
    weights = scores.softmax(-1)                weights = scores.softmax(-1)
    out = weights @ v                           out = weights @ v
    return out                                  return out, weights      <- weights escape:
                                                                            "attention weights are
                                                                             returned by the module"

A use that is dead does not count: a pure op whose result reaches neither the graph output nor
an op with an effect (x-transformers clones its scores into an intermediates record that its
forward then drops: `qk_similarities = sim.clone()`, unused). The replacement erases such uses.

The dataflow graph is a networkx DiGraph over FX nodes (edge: producer -> user).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import networkx as nx
import torch.fx

from passes.graph_walk import describe


def dataflow_graph(graph: torch.fx.Graph) -> nx.DiGraph:
    """Producer -> user edges of an FX graph."""
    dataflow = nx.DiGraph()
    for node in graph.nodes:
        dataflow.add_node(node)
        for user in node.users:
            dataflow.add_edge(node, user)
    return dataflow


def live_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes whose value reaches the graph output or an op with an effect.

        y = x.clone()            # dead: nothing reads y
        z = x * 2; z.add_(1)     # live: add_ changes z in place
    """
    live: set[torch.fx.Node] = set()
    pending = [node for node in graph.nodes if not is_pure(node)]
    while pending:
        node = pending.pop()
        if node in live:
            continue
        live.add(node)
        pending.extend(node.all_input_nodes)
    return live


_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                  operator.iand, operator.ior, operator.ixor, operator.setitem})


def is_pure(node: torch.fx.Node) -> bool:
    """A function or method call with no effect besides its result (so erasable when unread)."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    if node.target in _IN_PLACE_OPERATORS:
        return False
    # In-place methods (`x.add_(y)`) mutate an input: their effect lives on when their result is unused.
    return not (node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"))


def dead_uses(core: Iterable[torch.fx.Node], live: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """The dead nodes reading `core` (directly or through each other), users before what they read."""
    core = set(core)
    found, pending = [], [user for node in core for user in node.users if user not in core and user not in live]
    seen = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        found.append(node)
        pending.extend(node.users)
    position = {node: index for index, node in enumerate(next(iter(core)).graph.nodes)} if core else {}
    return sorted(found, key=position.__getitem__, reverse=True)


def escaping_uses(core: Iterable[torch.fx.Node], output: torch.fx.Node,
                  roles: dict[torch.fx.Node, str], live: set[torch.fx.Node] | None = None) -> list[str]:
    """Reasons, for a user, why intermediate values of `core` are read outside it.

    `roles` names what each intermediate node holds ("scores", "attention weights"). With `live`
    (see `live_nodes`), uses outside it are dead and not reasons.
    """
    core = set(core)
    reasons = []
    for node in core:
        if node is output:
            continue
        outside = [user for user in node.users if user not in core and (live is None or user in live)]
        if not outside:
            continue
        role = roles.get(node, "intermediate value")
        if any(user.op == "output" for user in outside):
            reasons.append(f"{role} are returned by the module (used by the graph output)")
        others = [describe(user) for user in outside if user.op != "output"]
        if others:
            reasons.append(f"{role} ({describe(node)}) are also used by {', '.join(others)}")
    return sorted(set(reasons))


def is_convex(dataflow: nx.DiGraph, core: Iterable[torch.fx.Node]) -> bool:
    """No path core -> outside -> core."""
    core = set(core)
    left = set()
    for node in core:
        left.update(user for user in dataflow.successors(node) if user not in core)
    reachable_outside = set(left)
    for node in left:
        reachable_outside |= nx.descendants(dataflow, node)
    return reachable_outside.isdisjoint(core)
