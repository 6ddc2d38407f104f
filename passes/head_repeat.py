"""Repeated key/value heads: GQA and MQA written out by hand.

Models with fewer key/value heads than query heads either repeat k and v up to the query heads
before a plain attention, or let matmul broadcast a single key/value head. Passing the
un-repeated k and v with `enable_gqa=True` is exact (SDPA's GQA maps query head h to key/value
head h // n_rep, which is what repeating each head n_rep times in a row does) and lets the
replacement keep one state per key/value head.

    k.repeat_interleave(2, dim=1)                                     -> (k, 2)
    k[:, :, None, :, :].expand(b, hk, 2, n, d).reshape(b, hk * 2, n, d)  -> (k, 2)  (transformers' repeat_kv)
    k.repeat(1, 2, 1, 1)                                              -> None: heads tiled, not repeated
"""

from __future__ import annotations

from typing import Any

import torch.fx

from passes.graph_walk import (
    EXPAND, GETITEM, REPEAT_INTERLEAVE, RESHAPE, UNSQUEEZE, match, normalize_dim, same_shape, same_size,
    shape_of,
)


def _unsqueezed_input(node: torch.fx.Node, dim: int) -> torch.fx.Node | None:
    """X when node is X with a new axis of size 1 inserted at `dim` (of the result)."""
    if bound := match(node, UNSQUEEZE):
        shape = shape_of(node)
        return bound["input"] if shape is not None and normalize_dim(bound["dim"], len(shape)) == dim else None
    if bound := match(node, GETITEM):
        index, source = bound["index"], bound["input"]
        source_shape = shape_of(source)
        if not isinstance(index, tuple) or source_shape is None:
            return None
        full = slice(None, None, None)
        if any(item is not None and item is not Ellipsis and item != full for item in index):
            return None
        explicit = sum(1 for item in index if item == full)
        expanded: list = []
        for item in index:
            if item is Ellipsis:
                expanded += [full] * (len(source_shape) - explicit)
            else:
                expanded.append(item)
        nones = [position for position, item in enumerate(expanded) if item is None]
        return source if nones == [dim] else None
    return None


def head_repeat(node: Any) -> tuple[torch.fx.Node, int] | None:
    """(X, n_rep) when node repeats each head of X (..., Hk, n, d) n_rep times in a row."""
    shape = shape_of(node)
    if shape is None or len(shape) < 3:
        return None
    ndim = len(shape)
    if bound := match(node, REPEAT_INTERLEAVE):
        repeats, dim = bound["repeats"], bound["dim"]
        if isinstance(repeats, int) and isinstance(dim, int) and normalize_dim(dim, ndim) == ndim - 3:
            return bound["input"], repeats
        return None
    # transformers' repeat_kv: x[:, :, None, :, :].expand(b, hk, n_rep, s, d).reshape(b, hk * n_rep, s, d)
    reshape = match(node, RESHAPE)
    expand = match(reshape["input"], EXPAND) if reshape else None
    if expand is None:
        return None
    # The repeat axis sits right after the head axis: index ndim - 2 of the 5-D expanded tensor.
    source = _unsqueezed_input(expand["input"], ndim - 2)
    source_shape, expanded_shape = shape_of(source), shape_of(reshape["input"])
    if source is None or source_shape is None or expanded_shape is None or len(source_shape) != ndim:
        return None
    n_rep = expanded_shape[ndim - 2]
    expected_expanded = (*source_shape[:-2], n_rep, *source_shape[-2:])
    if not isinstance(n_rep, int) or not same_shape(expanded_shape, expected_expanded):
        return None
    if not same_shape(shape, (*source_shape[:-3], source_shape[-3] * n_rep, *source_shape[-2:])):
        return None
    return source, n_rep


def broadcast_heads(q_shape: tuple, k_shape: tuple) -> bool:
    """k/v with fewer heads than q, broadcast by the product (multi-query written with a size-1 head)."""
    return len(q_shape) >= 3 and not same_size(q_shape[-3], k_shape[-3])
