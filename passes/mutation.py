"""In-place mutation: is a value changed after it is computed, directly or through a view?

FX records a mutation as a node that reads the value and returns nothing anyone uses, so a walk
over a node's inputs never sees it. A mask built in two steps, as transformers 4.x builds Llama's
causal + padding mask, is then misread:

    causal_mask = torch.full((n, n), min).triu(1)[None, None].expand(b, 1, n, n).clone()
    causal_mask[:, :, :, :m] = causal_mask[:, :, :, :m].masked_fill(padding, min)   # setitem
    scores = scores + causal_mask            # the inputs of `causal_mask` say: causal only

`mutation_of(node)` finds such a mutation of `node` or of anything it is computed from, so that
whoever proves a value from its inputs can refuse instead.
"""

from __future__ import annotations

import operator

import torch.fx

from passes.graph_walk import describe

_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                  operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                  operator.ilshift, operator.irshift, operator.setitem})

# Ops whose result may share storage with their first argument: a mutation of it is a mutation of
# the argument. `to`, `contiguous` and the dtype casts return their input itself when nothing changes.
_VIEW_NAMES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "transpose", "swapaxes", "swapdims",
    "permute", "t", "narrow", "select", "squeeze", "unsqueeze", "diagonal", "as_strided", "unflatten", "flatten",
    "movedim", "moveaxis", "split", "chunk", "unbind", "tensor_split", "detach", "alias", "real", "imag",
    "to", "type", "type_as", "contiguous", "float", "double", "half", "bfloat16", "bool", "int", "long",
    "broadcast_to", "unfold", "mT", "T", "mH", "H", "view_as_real", "view_as_complex",
})


def is_in_place(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    """Does `node` change `target` in place (as its first argument, or through out=)?"""
    if node.kwargs.get("out") is target:
        return True
    if not node.args or node.args[0] is not target:
        return False
    if node.op == "call_function" and node.target in _IN_PLACE_OPERATORS:
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", "") in ("_operator", "operator"):
        return False  # operator.and_ and or_ are the out-of-place `&` and `|`
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _may_alias(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or not node.args or node.args[0] is not source:
        return False
    if node.op == "call_function" and node.target in (operator.getitem, getattr):
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in _VIEW_NAMES


def _aliases(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node` and every value that may be a view of it."""
    found, pending = [], [node]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.append(current)
        pending.extend(user for user in current.users if _may_alias(user, current))
    return found


def _mutation_read_later(node: torch.fx.Node, position: dict) -> torch.fx.Node | None:
    """An in-place change of `node` (or of a view of it) that something reads after it happened.

    A change whose result is the only thing read afterwards is dataflow like any other op
    (T5's `relative_buckets += ...` is read through the result of `+=`); one followed by a read of
    the old name is invisible to a walk over inputs."""
    aliases = _aliases(node)
    for alias in aliases:
        for mutation in alias.users:
            if not is_in_place(mutation, alias):
                continue
            readers = [user for other in aliases for user in other.users if user is not mutation]
            if any(position[reader] > position[mutation] for reader in readers):
                return mutation
    return None


def mutation_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """An in-place change of `node`, or of a value it is computed from, that is read after it
    happened (so that `node`'s inputs do not say its value); None if there is none."""
    position = {other: index for index, other in enumerate(node.graph.nodes)}
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current in seen or not isinstance(current, torch.fx.Node):
            continue
        seen.add(current)
        found = _mutation_read_later(current, position)
        if found is not None:
            return found
        pending.extend(current.all_input_nodes)
    return None


def mutation_reason(node: torch.fx.Node) -> str:
    """Why `node`'s value cannot be read from its inputs ("" when it can)."""
    found = mutation_of(node)
    if found is None:
        return ""
    return (f"{describe(node)} is changed in place after it is computed ({describe(found)}), so its value "
            f"cannot be proven from the ops that built it")
