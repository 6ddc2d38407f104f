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

The dataflow graph is a networkx DiGraph over FX nodes (edge: producer -> user).
"""

from __future__ import annotations

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


def escaping_uses(core: Iterable[torch.fx.Node], output: torch.fx.Node,
                  roles: dict[torch.fx.Node, str]) -> list[str]:
    """Reasons, for a user, why intermediate values of `core` are read outside it.

    `roles` names what each intermediate node holds ("scores", "attention weights").
    """
    core = set(core)
    reasons = []
    for node in core:
        if node is output:
            continue
        outside = [user for user in node.users if user not in core]
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
