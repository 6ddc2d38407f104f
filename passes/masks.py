"""Classify the mask of an attention site as none, causal, key_padding, causal+key_padding, key_bias,
causal+key_bias or general.

The mask reaches a site as *terms* (what the matcher in `attention_sites.py` collected): a boolean
whose True means attend (`where(m, s, -inf)`, SDPA's bool `attn_mask`), a boolean whose True means
masked (`masked_fill(m, -inf)`), or an additive float (`s + m`, SDPA's float `attn_mask`). Each term
is split into the leaves it is an AND (or, for additive terms, a sum) of, through the operations
that only broadcast (`expand`, `&`, `~`, `where(m, 0, -inf)`, ...). Then, per leaf:

- a leaf that depends only on constants and sizes is *computed* (see `constants.py`); all such
  leaves together make one constant pattern, which must be all-true (`none`), exactly SDPA's
  top-left causal pattern `torch.ones(n_q, n_k).tril()` (`causal`), or constant along the query
  axis (`key_padding`); anything else is `general` (sliding window, blocks, bottom-right causal);
- a leaf that depends on a runtime input must be constant along the query axis *by its shape*
  (size 1 there before broadcasting): then it is a key-padding mask, kept as a graph node for the
  replacement; otherwise the mask is `general`.

    # GPT-2 eager, transformers 5 (Dynamo graph), scores (2, 4, 8, 8)
    causal = kv_idx <= q_idx                        -> constant leaf, computed: tril  -> causal
    padding = attention_mask[batch_idx, kv_idx]     -> runtime leaf, shape (2, 1, 1, 8)  -> key_padding
    mask = torch.where((ones & causal & padding).expand(2, -1, 8, 8), 0.0, finfo.min)
    scores + mask                                   => "causal+key_padding"

A constant additive leaf constant along the query axis whose values are not all 0 or removed (at or
below MASKED_BELOW: -inf, finfo.min, -1e9) is a per-key *bias* (MPT-style ALiBi), not padding: the
kind says `key_bias` (`causal+key_bias`), and the leaf is passed on with the key-padding terms, as
a float mask (the replacement's op must then weight every row's keys exactly, causal rows included).

With dynamic shapes a constant leaf is computed at the traced sizes and checked again at other
sizes of the same symbols (n + 3, n/2, n/4, ... and 2n .. 16n); the classification must agree at
every size that can be computed, and shape guards then keep the compiled graph to the range of
sizes checked: a length outside it recompiles, and the mask is proven again there.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from passes.constants import CannotEvaluate, ConstantFolder, concrete
from passes.mutation import mutation_reason
from passes.graph_walk import (
    BROADCAST, CAST, LOGICAL_AND, LOGICAL_NOT, LOGICAL_OR, MASKED_FILL, WHERE, WHERE_METHOD, ADD,
    SUBTRACT, describe, dtype_of, is_number, match, shape_label, shape_of,
)

# An additive value at or below this removes a key: exp(-1e4) is 0 in float32 and float64 alike.
MASKED_BELOW = -1e4

KINDS = ("none", "causal", "key_padding", "causal+key_padding", "key_bias", "causal+key_bias", "general")

# Forms of a mask term: how its value enters the scores.
ATTEND = "attend"        # bool, True keeps the key
MASKED = "masked"        # bool, True removes the key
ADDITIVE = "additive"    # float, added to the scores
SUBTRACTED = "subtracted"  # float, subtracted from the scores


@dataclass(frozen=True)
class MaskTerm:
    node: Any  # a graph node (or a Python number for literal terms)
    form: str  # ATTEND | MASKED | ADDITIVE | SUBTRACTED
    # ATTEND / MASKED: the finite score a removed key gets (masked_fill(~keep, finfo.min)), or None
    # for -inf. A row whose every key is removed by a finite fill averages its values, by -inf is
    # empty: the replacement must keep that difference, so it passes a finite fill as a float mask.
    fill: float | None = None

    def negated(self) -> "MaskTerm":
        flipped = {ATTEND: MASKED, MASKED: ATTEND, ADDITIVE: SUBTRACTED, SUBTRACTED: ADDITIVE}
        return MaskTerm(self.node, flipped[self.form], self.fill)

    def on(self, node: Any) -> "MaskTerm":
        """The same term on another node (its input through a cast, broadcast or call)."""
        return MaskTerm(node, self.form, self.fill)


@dataclass(frozen=True)
class MaskClassification:
    kind: str                          # one of KINDS
    is_causal: bool
    key_padding: tuple[MaskTerm, ...]  # leaves constant along the query axis, for the replacement
    reason: str = ""                   # why the mask is general ("" otherwise)
    # which keys a causal row averages when every key it sees is removed by a finite fill: "visible"
    # (the causal part is -inf, or SDPA's is_causal), or "all" (the causal part has a finite fill too,
    # as transformers' eager masks: every key then has the same score); SDPA's signature says "visible"
    masked_rows: str = "visible"


def is_very_negative(value: Any, folder: ConstantFolder) -> bool:
    """A fill value that removes a key: a number, or a constant tensor, at or below MASKED_BELOW."""
    if is_number(value):
        return value <= MASKED_BELOW
    if isinstance(value, torch.fx.Node) and folder.is_constant(value):
        try:
            computed = folder.evaluate(value)
        except CannotEvaluate:
            return False
        if is_number(computed):
            return computed <= MASKED_BELOW
        if isinstance(computed, torch.Tensor) and computed.is_floating_point():
            return bool((computed <= MASKED_BELOW).all())
    return False


def removal_fill(value: Any, folder: ConstantFolder) -> float | None:
    """The finite value a very negative fill writes (a number, or a constant tensor of one value);
    None for -inf, or when it cannot be read."""
    if isinstance(value, torch.fx.Node) and folder.is_constant(value):
        try:
            value = torch.as_tensor(folder.evaluate(value))
        except CannotEvaluate:
            return None
        if value.numel() == 0 or not bool((value == value.flatten()[0]).all()):
            return None
        value = value.flatten()[0].item()
    return float(value) if is_number(value) and math.isfinite(value) else None


def _is_zero(value: Any, folder: ConstantFolder) -> bool:
    if is_number(value):
        return value == 0
    if isinstance(value, torch.fx.Node) and folder.is_constant(value):
        try:
            computed = folder.evaluate(value)
        except CannotEvaluate:
            return False
        return bool((torch.as_tensor(computed) == 0).all())
    return False


# ---------------------------------------------------------------------------------------------
# Splitting terms into leaves


def _split(term: MaskTerm, folder: ConstantFolder) -> list[MaskTerm]:
    """The leaves whose conjunction (bool) or sum (additive) the term is."""
    node = term.node
    if not isinstance(node, torch.fx.Node):
        return [term]
    # A mask built before a checkpointed block reaches its body as a placeholder: split what the
    # calls pass. Leaves left in the enclosing graph are imported into the body on replacement.
    passed = folder.bound_value(node)
    if passed is not None:
        leaves = _split(term.on(passed), folder)
        if leaves != [term.on(passed)]:
            return leaves
    if term.form in (ATTEND, MASKED):
        return _split_boolean(term, folder)
    return _split_additive(term, folder)


def _split_boolean(term: MaskTerm, folder: ConstantFolder) -> list[MaskTerm]:
    node = term.node
    if (bound := match(node, BROADCAST)) or (bound := _bool_cast(node)):
        return _split(term.on(bound["input"]), folder)
    if bound := match(node, LOGICAL_NOT):
        return _split(term.on(bound["input"]).negated(), folder)
    # attend = a AND b; masked = a OR b (De Morgan: the masked set of an AND is the OR of masked sets).
    joins = LOGICAL_AND if term.form == ATTEND else LOGICAL_OR
    if (bound := match(node, joins)) and _all_bool(bound["input"], bound["other"]):
        return _split(term.on(bound["input"]), folder) + _split(term.on(bound["other"]), folder)
    return [term]


def _split_additive(term: MaskTerm, folder: ConstantFolder) -> list[MaskTerm]:
    node = term.node
    if (bound := match(node, BROADCAST)) or (bound := _float_cast(node)):
        return _split(MaskTerm(bound["input"], term.form), folder)
    if (bound := match(node, ADD)) and bound["alpha"] == 1:
        return _split(MaskTerm(bound["input"], term.form), folder) + _split(
            MaskTerm(bound["other"], term.form), folder)
    if (bound := match(node, SUBTRACT)) and bound["alpha"] == 1:
        return _split(MaskTerm(bound["input"], term.form), folder) + _split(
            MaskTerm(bound["other"], term.form).negated(), folder)
    if term.form == ADDITIVE:
        where = match(node, WHERE) or match(node, WHERE_METHOD)
        if where is not None and "input" in where and "other" in where:
            condition, kept, removed = where["condition"], where["input"], where["other"]
            # where(c, x, -inf) == x + where(c, 0, -inf): c attends, x is an additive bias.
            if is_very_negative(removed, folder):
                return _split(MaskTerm(condition, ATTEND, removal_fill(removed, folder)), folder) + _bias(kept, folder)
            if is_very_negative(kept, folder):
                return _split(MaskTerm(condition, MASKED, removal_fill(kept, folder)), folder) + _bias(removed, folder)
        if (fill := match(node, MASKED_FILL)) and is_very_negative(fill["value"], folder):
            masked = MaskTerm(fill["mask"], MASKED, removal_fill(fill["value"], folder))
            return _split(masked, folder) + _bias(fill["input"], folder)
    return [term]


def _bias(value: Any, folder: ConstantFolder) -> list[MaskTerm]:
    return [] if _is_zero(value, folder) else _split(MaskTerm(value, ADDITIVE), folder)


def _all_bool(*nodes: Any) -> bool:
    return all(dtype_of(node) is torch.bool for node in nodes if isinstance(node, torch.fx.Node))


def _bool_cast(node: torch.fx.Node) -> dict | None:
    bound = match(node, CAST)
    if bound and dtype_of(node) is torch.bool and dtype_of(bound["input"]) is torch.bool:
        return bound
    return None


def _float_cast(node: torch.fx.Node) -> dict | None:
    bound = match(node, CAST)
    source = dtype_of(bound["input"]) if bound else None
    if bound and source is not None and source.is_floating_point and dtype_of(node).is_floating_point:
        return bound
    return None


# ---------------------------------------------------------------------------------------------
# Classifying


def _varies_along_queries(shape: tuple | None, scores_ndim: int) -> bool:
    """By shape alone: does a leaf broadcast into the scores with more than one value per key column?"""
    if shape is None:
        return True
    if len(shape) < 2:
        return False
    query_size = shape[-2]
    return not (isinstance(query_size, int) and query_size == 1) or len(shape) > scores_ndim


def _constant_attend(leaf: MaskTerm, value: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(attend pattern, additive bias) of a computed constant leaf; one of them is None."""
    tensor = torch.as_tensor(value)
    if leaf.form in (ATTEND, MASKED):
        attend = tensor.bool()
        return (attend if leaf.form == ATTEND else ~attend), None
    if leaf.form == SUBTRACTED:
        tensor = -tensor
    removed = tensor <= MASKED_BELOW
    if bool((removed | (tensor == 0)).all()):
        return ~removed, None
    return None, tensor


def _pattern_kind(attend: torch.Tensor, n_q: int, n_k: int) -> str:
    """'none', 'causal', 'key_padding', 'bottom_right' or 'other' for a constant attend pattern."""
    full = torch.broadcast_to(attend, torch.broadcast_shapes(attend.shape, (n_q, n_k)))
    full = full.reshape(-1, n_q, n_k)
    if bool(full.all()):
        return "none"
    top_left = torch.ones(n_q, n_k, dtype=torch.bool, device=full.device).tril()
    if bool((full == top_left).all()):
        return "causal"
    if bool((full == full[:, :1, :]).all()):
        return "key_padding"
    if n_q != n_k and bool((full == top_left.new_ones(n_q, n_k).tril(n_k - n_q)).all()):
        return "bottom_right"
    return "other"


@dataclass
class _ConstantVerdict:
    kind: str          # none | causal | key_padding | general
    reason: str = ""


def _classify_constants(leaves: list[MaskTerm], scores_shape: tuple, is_causal: bool,
                        folder: ConstantFolder, sizes: dict | None) -> _ConstantVerdict:
    sizes_now = folder.traced_sizes if sizes is None else sizes
    n_q, n_k = (concrete(size, sizes_now) for size in scores_shape[-2:])
    attend = torch.ones((), dtype=torch.bool)
    for leaf in leaves:
        pattern, bias = _constant_attend(leaf, folder.evaluate(leaf.node, sizes))
        if bias is not None:
            if bias.dim() >= 2 and bias.shape[-2] != 1 and not bool((bias == bias[..., :1, :]).all()):
                return _ConstantVerdict("general", f"additive bias {describe(leaf.node)} varies along the "
                                                   "query axis (ALiBi/relative position?)")
            continue  # a per-key bias: kept as a key-padding term
        attend = attend.to(pattern.device) & pattern
    if is_causal:
        attend = attend & torch.ones(n_q, n_k, dtype=torch.bool, device=attend.device).tril()
    kind = _pattern_kind(attend, n_q, n_k)
    if kind == "bottom_right":
        return _ConstantVerdict("general", f"causal mask is aligned bottom-right (n_q={n_q} < n_k={n_k}, "
                                           "as with a key/value cache); SDPA's is_causal is top-left")
    if kind == "other":
        return _ConstantVerdict("general", "constant mask is neither causal nor constant along the query "
                                           "axis (sliding window, block or document mask?)")
    return _ConstantVerdict(kind)


# Re-checking a mask at other sizes computes (n_q, n_k) patterns; skip sizes past this many entries.
_LARGEST_CHECKED_PATTERN = 1 << 24


def _other_sizes(symbols: frozenset, scores_shape: tuple, folder: ConstantFolder) -> list[dict]:
    """Size assignments besides the traced one, to re-check a mask that depends on symbolic sizes:
    n + 3, a ladder n/2, n/4, ... down to 2, and 2n, 4n, 8n, 16n while a pattern has at most
    _LARGEST_CHECKED_PATTERN entries, so that a class that changes past some length (a sliding
    window of W keys is causal up to n = W) is seen to change wherever W lies in the range the
    guard then covers (`_guard_checked_range`)."""
    traced = folder.traced_sizes
    changes = [lambda n: n + 3]
    changes += [lambda n, f=2 ** i: max(2, n // f) for i in range(1, 13)]
    changes += [lambda n, f=2 ** i: n * f for i in range(1, 5)]
    alternatives = []
    for change in changes:
        sizes = dict(traced)
        for symbol in symbols:
            if symbol in sizes:
                sizes[symbol] = change(sizes[symbol])
        try:
            n_q, n_k = (concrete(size, sizes) for size in scores_shape[-2:])
        except CannotEvaluate:
            continue
        if sizes != traced and sizes not in alternatives and n_q * n_k <= _LARGEST_CHECKED_PATTERN:
            alternatives.append(sizes)
    return alternatives


def _guard_checked_range(scores_shape: tuple, checked: list[dict]) -> None:
    """Install shape guards keeping (n_q, n_k) within the sizes the class was proven at: bool() of a
    SymBool records a guard in the shape environment (as lrcompile.compile.policy's thresholds do), so a
    length outside recompiles, and the mask is classified again there. No upper guard where no
    larger size could be checked (past _LARGEST_CHECKED_PATTERN entries, or past what the mask can
    be built at, e.g. a causal buffer's length): there the class is taken to hold, as it must be
    for a model that runs at such lengths without recompiling at every new one."""
    traced = checked[0]
    for size in scores_shape[-2:]:
        if not isinstance(size, torch.SymInt):
            continue
        values = [concrete(size, sizes) for sizes in checked]
        bool(size >= min(values))
        if max(values) > concrete(size, traced):
            bool(size <= max(values))


def classify_mask(terms: list[MaskTerm], scores_shape: tuple, folder: ConstantFolder,
                  is_causal: bool = False) -> MaskClassification:
    """Classify the terms masking scores of `scores_shape` (..., n_q, n_k); `is_causal` from SDPA."""
    leaves = [leaf for term in terms for leaf in _split(term, folder)]
    # the terms as the scores read them, and what they split into: either may be written in place
    for leaf in [*terms, *leaves]:
        mutated = _mutation_across_bodies(leaf.node, folder) if isinstance(leaf.node, torch.fx.Node) else ""
        if mutated:
            return MaskClassification("general", False, (), f"mask is general: {mutated}")
    constant = [leaf for leaf in leaves if folder.is_constant(leaf.node)]
    runtime = [leaf for leaf in leaves if not folder.is_constant(leaf.node)]

    for leaf in runtime:
        if _varies_along_queries(shape_of(leaf.node), len(scores_shape)):
            what = (f"boolean mask {describe(leaf.node)}" if leaf.form in (ATTEND, MASKED)
                    else f"additive bias {describe(leaf.node)}")
            hint = "" if leaf.form in (ATTEND, MASKED) else " (ALiBi/relative position?)"
            return MaskClassification("general", False, (), (
                f"mask is general: {what} is computed at run time (from inputs or parameters) and varies "
                f"along the query axis (shape {shape_label(shape_of(leaf.node))}){hint}; supported: causal "
                "and key-padding masks broadcast over queries"))

    try:
        verdict = _classify_constants(constant, scores_shape, is_causal, folder, None)
    except (CannotEvaluate, RuntimeError) as error:
        return MaskClassification("general", False, (), f"mask is general: could not compute its constant "
                                                        f"part to prove its pattern ({error})")
    if verdict.kind == "general":
        return MaskClassification("general", False, (), f"mask is general: {verdict.reason}")

    # With dynamic shapes the constant part is a function of the sizes: check it at other sizes too.
    mask_symbols = symbols = frozenset().union(*(folder.size_symbols(leaf.node) for leaf in constant))
    if symbols or is_causal:
        symbols |= _shape_symbols_of(scores_shape)
    checked = [folder.traced_sizes]
    for sizes in _other_sizes(symbols, scores_shape, folder):
        try:
            other = _classify_constants(constant, scores_shape, is_causal, folder, sizes)
        except (CannotEvaluate, RuntimeError):
            continue  # sizes this mask cannot be built at (e.g. past a causal buffer's length)
        if other.kind != verdict.kind:
            return MaskClassification("general", False, (), (
                f"mask is general: it is {verdict.kind} at the traced sizes but {other.kind} at other "
                f"sizes ({ {str(k): v for k, v in sizes.items()} })"))
        checked.append(sizes)
    if mask_symbols:  # SDPA's is_causal alone is tril at every size: nothing to guard
        _guard_checked_range(scores_shape, checked)

    key_padding = list(runtime)
    if verdict.kind == "key_padding":
        if any(_varies_along_queries(shape_of(leaf.node), len(scores_shape)) for leaf in constant):
            return MaskClassification("general", False, (), (
                "mask is general: its constant part masks whole key columns but is built from parts "
                "that vary along the query axis"))
        key_padding += constant
    # Per-key constant biases survive as key-padding terms even when the pattern is none/causal.
    key_padding += [leaf for leaf in constant if leaf not in key_padding
                    and leaf.form in (ADDITIVE, SUBTRACTED) and _is_bias(leaf, folder)]
    causal = verdict.kind == "causal"
    if key_padding:
        keys = "key_bias" if any(leaf in constant and leaf.form in (ADDITIVE, SUBTRACTED) and _is_bias(leaf, folder)
                                 for leaf in key_padding) else "key_padding"
        kind = f"causal+{keys}" if causal else keys
    else:
        kind = "causal" if causal else "none"
    masked_rows = "all" if causal and key_padding and _removes_finitely(constant, folder) else "visible"
    return MaskClassification(kind, causal, tuple(key_padding), masked_rows=masked_rows)


def _removes_finitely(constant: list[MaskTerm], folder: ConstantFolder) -> bool:
    """Does the constant (causal) part remove keys with a finite score (finfo.min) rather than -inf?
    Then a row whose visible keys are all padding sees every key at the same score, later ones
    included, and softmax averages them all; is_causal's -inf keeps only the visible ones."""
    for leaf in constant:
        if leaf.form in (ATTEND, MASKED):
            if leaf.fill is not None:
                return True
            continue
        try:
            value = folder.evaluate(leaf.node)
        except (CannotEvaluate, RuntimeError):
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point() and bool(
                ((value <= MASKED_BELOW) & torch.isfinite(value)).any()):
            return True
    return False


def _mutation_across_bodies(node: torch.fx.Node, folder: ConstantFolder) -> str:
    """mutation_reason for `node`, and for what the enclosing graph passes to the body placeholders it
    is computed from (a checkpointed layer gets its mask built, and changed, outside it)."""
    reason = mutation_reason(node)
    if reason or folder.enclosing is None:
        return reason
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for passed in folder.bindings.get(current, ()):
            if isinstance(passed, torch.fx.Node):
                reason = _mutation_across_bodies(passed, folder.enclosing)
                if reason:
                    return reason
        pending.extend(current.all_input_nodes)
    return ""


def _is_bias(leaf: MaskTerm, folder: ConstantFolder) -> bool:
    return _constant_attend(leaf, folder.evaluate(leaf.node))[1] is not None


def _shape_symbols_of(shape: tuple) -> frozenset:
    symbols: set = set()
    for size in shape:
        if isinstance(size, torch.SymInt):
            symbols |= size.node.expr.free_symbols
    return frozenset(symbols)

