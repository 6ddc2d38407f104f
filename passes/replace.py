"""Replace one supported attention site with a call to a given attention function.

The call has the signature of `F.scaled_dot_product_attention` and receives canonical tensors:
q (..., Hq, n_q, d), k (..., Hk, n_k, d), v (..., Hk, n_k, d_v), and `attn_mask` None or a
key-padding mask broadcastable to (..., Hq, 1, n_k) (bool, True = attend; or additive float).
Permutes/transposes are inserted to reach that layout from the site's own spelling, and after the
call to give back the layout of the node it replaces. The site's subgraph, and whatever only it
used (its causal-mask construction, for one), is removed.

    # before (nanoGPT)                                   # after replace_attention_site(gm, site, F.sdpa)
    att = (q @ k.transpose(-2, -1)) * 0.3535             attention = torch._C._nn.scaled_dot_product_attention(
    att = att.masked_fill(bias[:, :, :8, :8] == 0, -inf)     q, k, v, attn_mask=None, is_causal=True,
    att = F.softmax(att, dim=-1)                             scale=0.3535, enable_gqa=False)
    y = att @ v                                          y2 = attention.transpose(1, 2)
    y2 = y.transpose(1, 2)

Sites found before a replacement stay replaceable: a replaced output node records what replaced
it (`node.meta["attention_replaced_by"]`), and every node a site refers to is looked up through
that record, so `for s in sites: replace_attention_site(gm, s, fn)` works without searching again.

A site inside the body of a checkpointed block (see `higher_order.py`) is replaced inside that
body; a key-padding mask built before the block is passed into it as one more operand.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable

import torch
import torch.fx

from passes.attention_sites import AttentionSite, Replacement, TensorRecipe
from passes.escape import dead_uses, is_pure, live_nodes
from passes.graph_walk import dtype_of, example_value, shape_of
from passes.higher_order import import_value, module_holding
from passes.masks import ADDITIVE, ATTEND, MASKED, MaskTerm

_REPLACED_BY = "attention_replaced_by"
_COPIED_META = ("nn_module_stack", "stack_trace")


def replace_attention_site(gm: torch.fx.GraphModule, site: AttentionSite, attention_fn: Callable,
                           **fn_kwargs: Any) -> torch.fx.GraphModule:
    """Replace one supported site with attention_fn(q, k, v, attn_mask=..., is_causal=..., scale=...,
    enable_gqa=..., **fn_kwargs). Raises ValueError for an unsupported site. Returns gm (modified in
    place, linted, recompiled); a site in a body of gm is replaced there."""
    if not site.supported or site.replacement is None:
        raise ValueError(f"attention site {site.name!r} ({site.module_path or 'root'}) is not supported: "
                         f"{site.reason or 'no replacement plan'}; only sites with supported=True can be "
                         "replaced")
    output = site.output
    holder = module_holding(gm, output)
    if _REPLACED_BY in output.meta or holder is None or getattr(output, "_erased", False):
        raise ValueError(f"attention site {site.name!r} is not in this graph (already replaced, or found "
                         "in another GraphModule)")
    graph = holder.graph
    plan = site.replacement
    mask_terms = [_with_node(term, import_value(gm, graph, _current(term.node)))
                  for term in plan.mask_terms]
    existing = set(graph.nodes)
    with graph.inserting_before(output):
        attention, result = _emit(graph, dataclasses.replace(plan, mask_terms=tuple(mask_terms)),
                                  attention_fn, fn_kwargs)
    new_nodes = [node for node in graph.nodes if node not in existing]
    _propagate_metadata(new_nodes, template=output, attention=attention)

    output.replace_all_uses_with(result)
    output.meta[_REPLACED_BY] = result
    _remove_subgraph(graph, list(site.nodes))
    graph.lint()
    holder.recompile()
    if holder is not gm:
        gm.recompile()
    return gm


def _with_node(term: MaskTerm, node: Any) -> MaskTerm:
    return term if node is term.node else term.on(node)


def _current(node: Any) -> Any:
    """The node now holding `node`'s value, following earlier replacements."""
    while isinstance(node, torch.fx.Node) and _REPLACED_BY in node.meta:
        node = node.meta[_REPLACED_BY]
    return node


def _emit(graph: torch.fx.Graph, plan: Replacement, attention_fn: Callable, fn_kwargs: dict
          ) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(the attention call, the node holding the site's output) inserted at the graph's cursor."""
    q = _canonical(graph, plan.q)
    for factor, op in plan.q_factors:
        q = graph.call_function(operator.mul if op == "mul" else operator.truediv, (q, _current(factor)))
    k = _canonical(graph, plan.k)
    v = _canonical(graph, plan.v)
    if plan.compute_dtype is not None:  # what autocast did to the site's operands
        q, k, v = (graph.call_method("to", (x, plan.compute_dtype)) for x in (q, k, v))
    attn_mask = _key_padding_mask(graph, plan, plan.compute_dtype or dtype_of(plan.q.node))
    attention = graph.call_function(attention_fn, (q, k, v), {
        "attn_mask": attn_mask, "is_causal": plan.is_causal, "scale": plan.scale,
        "enable_gqa": plan.enable_gqa, **fn_kwargs,
    })
    result = attention
    if plan.output_permute is not None:
        result = graph.call_method("permute", (result, *plan.output_permute))
    if plan.output_dtype is not None:
        result = graph.call_method("to", (result, plan.output_dtype))
    return attention, result


def _canonical(graph: torch.fx.Graph, recipe: TensorRecipe) -> torch.fx.Node:
    node = _current(recipe.node)
    if recipe.permute is not None:
        node = graph.call_method("permute", (node, *recipe.permute))
    if recipe.transpose_last_two:
        node = graph.call_method("transpose", (node, -2, -1))
    return node


def _key_padding_mask(graph: torch.fx.Graph, plan: Replacement, dtype: torch.dtype | None):
    """One attn_mask from the key-padding terms: AND of the booleans, sum of the additive terms."""
    booleans, additive, additive_dtypes = [], [], []
    for term in plan.mask_terms:
        node = _current(term.node)
        if term.form in (ATTEND, MASKED) and term.fill is not None:
            # a finite fill stays a float mask: a row that removes every key averages, as eager does
            mask_dtype = dtype if dtype is not None else torch.get_default_dtype()
            fill = graph.call_function(torch.tensor, (max(term.fill, torch.finfo(mask_dtype).min),), {"dtype": mask_dtype})
            kept, removed = (0.0, fill) if term.form == ATTEND else (fill, 0.0)
            additive.append(graph.call_function(torch.where, (node, kept, removed)))
            additive_dtypes.append(mask_dtype)
        elif term.form == ATTEND:
            booleans.append(node)
        elif term.form == MASKED:
            booleans.append(graph.call_function(operator.invert, (node,)))
        else:
            additive.append(node if term.form == ADDITIVE else graph.call_function(operator.neg, (node,)))
            additive_dtypes.append(dtype_of(node))
    boolean = _join(graph, operator.and_, booleans)
    if not additive:
        return _at_least_2d(graph, boolean, plan.mask_terms)
    if boolean is not None:
        additive.append(graph.call_function(torch.where, (boolean, 0.0, float("-inf"))))
        additive_dtypes.append(torch.get_default_dtype())
    mask = _join(graph, operator.add, additive)
    # SDPA takes a float mask only in q's dtype; the original `scores + mask` promoted instead.
    mask_dtype = functools.reduce(torch.promote_types, additive_dtypes) if None not in additive_dtypes else None
    if dtype is not None and mask_dtype != dtype:
        mask = graph.call_method("to", (mask, dtype))
    return _at_least_2d(graph, mask, plan.mask_terms)


def _at_least_2d(graph: torch.fx.Graph, mask: torch.fx.Node | None, terms) -> torch.fx.Node | None:
    """SDPA's attn_mask has a query axis: a (n_k,) key mask, which broadcast in the original
    `masked_fill`, becomes (1, n_k)."""
    if mask is None:
        return None
    shapes = [shape_of(term.node) if isinstance(term.node, torch.fx.Node) else () for term in terms]
    if all(shape is not None and len(shape) >= 2 for shape in shapes):
        return mask
    return graph.call_function(torch.atleast_2d, (mask,))


def _join(graph: torch.fx.Graph, op: Callable, nodes: list) -> torch.fx.Node | None:
    return functools.reduce(lambda a, b: graph.call_function(op, (a, b)), nodes) if nodes else None


def _remove_subgraph(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase the site's dead readers (see escape.py), its nodes, then what only they used (pure nodes
    left without users)."""
    for node in dead_uses([node for node in nodes if not getattr(node, "_erased", False)], live_nodes(graph)):
        graph.erase_node(node)
    position = {node: index for index, node in enumerate(graph.nodes)}
    doomed = sorted((node for node in nodes if node in position), key=position.__getitem__, reverse=True)
    candidates: list[torch.fx.Node] = []
    for node in doomed:
        candidates.extend(node.all_input_nodes)
        graph.erase_node(node)
    while candidates:
        node = candidates.pop()
        if getattr(node, "_erased", False) or node.users or not is_pure(node):
            continue
        candidates.extend(node.all_input_nodes)
        graph.erase_node(node)


def _propagate_metadata(nodes: list[torch.fx.Node], template: torch.fx.Node, attention: torch.fx.Node) -> None:
    """Module path and stack trace from the replaced node; example values computed on fake tensors.

    The attention function itself runs once on fake tensors here; one that cannot (a kernel with no
    fake implementation) gets an empty fake result of the canonical output shape instead.
    """
    fake_mode = _fake_mode_of(template)
    for node in nodes:
        for key in _COPIED_META:
            if key in template.meta:
                node.meta[key] = template.meta[key]
        if fake_mode is None:
            continue
        value = _fake_run(node, fake_mode)
        if value is None and node is attention:
            value = _fake_attention_result(node, fake_mode)
        if value is not None:
            node.meta["example_value"] = value


def _fake_mode_of(node: torch.fx.Node):
    value = example_value(node)
    return getattr(value, "fake_mode", None)


def _fake_run(node: torch.fx.Node, fake_mode) -> Any:
    args = torch.fx.node.map_arg(node.args, example_value)
    kwargs = torch.fx.node.map_arg(node.kwargs, example_value)
    try:
        with fake_mode:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
    except Exception:  # no fake value is better than a failed replacement; Inductor re-traces anyway
        return None


def _fake_attention_result(node: torch.fx.Node, fake_mode) -> Any:
    """An empty fake tensor of the canonical output shape (..., Hq, n_q, d_v) in q's dtype."""
    if len(node.args) < 3:
        return None
    q, v = example_value(node.args[0]), example_value(node.args[2])
    if not isinstance(q, torch.Tensor) or not isinstance(v, torch.Tensor):
        return None
    with fake_mode:
        return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
