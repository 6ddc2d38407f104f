"""Find softmax-attention sites in an FX graph by dataflow, and decide which can be replaced.

A site is a softmax over the key axis whose input is, up to scaling, masking and casts, a product
Q Kᵀ, and whose output, up to casts and dropout, multiplies V; or an
`F.scaled_dot_product_attention` call. The search starts at every softmax and walks:

- backward through the score transformations (`SCORE_RULES`: casts, scale by a number / a 0-d
  tensor / a symbolic scalar, additive masks, `masked_fill`, `where`) to a `matmul` / `@` / `bmm`
  / `einsum` whose operands are activations (not weights);
- forward through casts and dropout to the product with V.

Nothing here depends on how the heads were laid out or which module wrote the code; each spelling
of an operation is one row of a table in `graph_walk.py`.

    # before: nanoGPT, as Dynamo traces it                    # what find_attention_sites reports
    att = (q @ k.transpose(-2, -1)) * 0.3535                  AttentionSite(
    att = att.masked_fill(bias[:, :, :8, :8] == 0, -inf)          name="softmax", module_path="h.0.attn",
    att = F.softmax(att, dim=-1)                                  spelling="matmul+softmax",
    att = F.dropout(att, 0.1, False)                              mask="causal", is_causal=True,
    y = att @ v                                                   scale=0.3535, supported=True, ...)

Each site carries a `Replacement` plan (canonical q/k/v recipes, mask terms, scale, GQA) that
`replace.py` turns into one call. Sites that cannot be replaced exactly are still reported, with
`supported=False` and a reason a user can act on.
"""

from __future__ import annotations

import sys

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from passes.constants import ConstantFolder
from passes.einsum_layout import EinsumLayoutError, read_output_einsum, read_scores_einsum
from passes.escape import dataflow_graph, escaping_uses, is_convex, live_nodes
from passes.graph_walk import (
    ADD, BADDBMM, CAST, DIVIDE, DROPOUT, EINSUM, GETITEM, MASKED_FILL, MATMUL, MATRIX_TRANSPOSE, MULTIPLY,
    PERMUTE, SDPA, SOFTMAX, SUBTRACT, TRANSPOSE, VIEW_LIKE, WHERE, WHERE_METHOD, describe, device_type_of, dtype_of,
    is_getattr_mT, is_number, is_symbolic_scalar, is_tensor, match, module_path_of, normalize_dim,
    numel_is_one, same_shape, same_shape_by_contract, shape_label, shape_of, size_label,
)
from passes.head_repeat import broadcast_heads, head_repeat
from passes.higher_order import Body, bodies
from passes.masks import (
    ADDITIVE, ATTEND, MASKED, SUBTRACTED, MaskClassification, MaskTerm, classify_mask, is_very_negative, removal_fill,
)


@dataclass(frozen=True)
class TensorRecipe:
    """A canonical operand: `node`, permuted by `permute`, then its last two axes swapped."""

    node: torch.fx.Node
    permute: tuple[int, ...] | None = None
    transpose_last_two: bool = False

    def shape(self) -> tuple | None:
        shape = shape_of(self.node)
        if shape is None:
            return None
        if self.permute is not None:
            shape = tuple(shape[axis] for axis in self.permute)
        if self.transpose_last_two:
            shape = (*shape[:-2], shape[-1], shape[-2])
        return shape

    @property
    def is_plain(self) -> bool:
        return self.permute is None and not self.transpose_last_two


@dataclass(frozen=True)
class Replacement:
    """Everything `replace_attention_site` needs to emit the call for a supported site."""

    q: TensorRecipe
    k: TensorRecipe
    v: TensorRecipe
    q_factors: tuple[tuple[Any, str], ...]  # (node, "mul" | "div"): run-time scales folded into q
    mask_terms: tuple[MaskTerm, ...]        # key-padding leaves, broadcastable to (..., Hq, 1, n_k)
    is_causal: bool
    scale: float | None                     # None: SDPA's default 1/sqrt(d)
    enable_gqa: bool
    output_permute: tuple[int, ...] | None  # canonical (..., n_q, d_v) -> the original output layout
    output_dtype: torch.dtype | None        # cast the result to this when it differs from q's dtype
    compute_dtype: torch.dtype | None = None  # cast q, k, v to this first: the dtype autocast computed
                                              # the site in, where they arrive in different dtypes


@dataclass
class AttentionSite:
    name: str                 # the softmax or SDPA node's name, unique in the graph
    module_path: str          # e.g. "h.0.attn"; "" for the root module or when unknown
    spelling: str             # "sdpa", "matmul+softmax", "bmm+softmax", "einsum+softmax"
    output: torch.fx.Node     # the node holding the attention output (replaced by the pass)
    nodes: frozenset          # every node of the matched subgraph (removed by the pass)
    query_shape: tuple        # canonical (..., Hq, n_q, d); symbolic sizes as strings
    key_shape: tuple          # canonical (..., Hk, n_k, d), un-repeated when GQA was detected
    value_shape: tuple        # canonical (..., Hk, n_k, d_v)
    mask: str                 # "none" | "causal" | "key_padding" | "causal+key_padding" | "key_bias" |
                              # "causal+key_bias" | "general" (passes.masks.KINDS)
    is_causal: bool
    scale: float | None       # the softmax scale when it is a number; None: SDPA's default
    supported: bool           # True: replace_attention_site reproduces it exactly
    reason: str               # why it is kept ("" when supported)
    notes: str = ""           # facts a report may show: run-time scales folded into q, GQA
    device: str = ""          # device type of q ("cpu", "cuda", ...); "" when unknown
    replacement: Replacement | None = field(default=None, repr=False, compare=False)
    masked_rows: str = "visible"  # passes.masks.MaskClassification.masked_rows: "all" where a left-padded
                                  # causal row averages every key (a finite causal fill), which a
                                  # replacement with SDPA's signature alone cannot say


def find_attention_sites(gm: torch.fx.GraphModule, folder: ConstantFolder | None = None) -> list[AttentionSite]:
    """Every attention site of `gm`, in graph order, supported or not (see the module docstring).

    Sites inside the bodies of wrapping higher-order ops (activation checkpointing, `wrap`,
    `nested_compile_region`; see `higher_order.py`) are included, in the place of the call, named
    after the body: `wrap_body_0.softmax`. `folder`: the constants of `gm`, when the caller has them.
    """
    if not any(shape_of(node) is not None for node in gm.graph.nodes):
        raise ValueError("the graph carries no shape metadata (node.meta['example_value'], 'val' or "
                         "'tensor_meta'); pass a graph from Dynamo or run torch.fx.passes.shape_prop."
                         "ShapeProp on it first")
    softmaxes = [node for node in gm.graph.nodes if match(node, SOFTMAX) is not None]
    sdpas = [node for node in gm.graph.nodes if match(node, SDPA) is not None]
    body_list = bodies(gm)
    if not softmaxes and not sdpas and not body_list:
        return []
    finder = _SiteFinder(gm, folder)
    sites = [finder.softmax_site(node) for node in softmaxes] + [finder.sdpa_site(node) for node in sdpas]
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    placed = [(order[site.output], site) for site in sites if site is not None]
    for body in body_list:
        placed += [(order[body.calls[0]], site) for site in _body_sites(body, finder.folder)]
    return [site for _, site in sorted(placed, key=lambda pair: pair[0])]


def _body_sites(body: Body, folder: ConstantFolder) -> list[AttentionSite]:
    """The sites of one body, seen through what its calls pass (constants, parameters, masks)."""
    body_folder = ConstantFolder(body.module, bindings=body.bindings(), enclosing=folder)
    sites = find_attention_sites(body.module, body_folder)
    for site in sites:
        site.name = f"{body.attribute}.{site.name}"
        if len(body.calls) > 1:
            shared = (f"in `{body.attribute}`, a body shared by {len(body.calls)} calls "
                      f"(nested_compile_region): one decision and one rewrite serve them all")
            site.notes = "; ".join(filter(None, [site.notes, shared]))
    return sites


# ---------------------------------------------------------------------------------------------
# Backward from the softmax: the score transformations


@dataclass(frozen=True)
class _Step:
    """What one node between Q Kᵀ and the softmax does to the scores."""

    scale: float = 1.0                 # multiplies the scores by a number
    factor: tuple | None = None        # (node, "mul" | "div"): a run-time scale
    mask: MaskTerm | None = None
    unsupported: str | None = None     # a transformation the replacement cannot reproduce


@dataclass
class _ScoreWalk:
    product: torch.fx.Node
    nodes: list = field(default_factory=list)  # from the softmax input back to (excluding) the product
    scale: float = 1.0
    factors: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)

    def add(self, node: torch.fx.Node, step: _Step) -> None:
        self.nodes.append(node)
        self.scale *= step.scale
        if step.factor is not None:
            self.factors.append(step.factor)
        if step.mask is not None:
            self.masks.append(step.mask)
        if step.unsupported is not None:
            self.unsupported.append(step.unsupported)


def _scale_of(value: Any, op: str) -> _Step | None:
    """A step scaling the scores by `value` (a number, a symbolic scalar or a one-element tensor)."""
    if is_number(value):
        if op == "div" and value == 0:
            return None
        return _Step(scale=value if op == "mul" else 1.0 / value)
    if is_symbolic_scalar(value) or (is_tensor(value) and numel_is_one(value)):
        return _Step(factor=(value, op))
    return None


def _cast_steps(node, bound, folder):
    return [(bound["input"], _Step())]


def _multiply_steps(node, bound, folder):
    steps = []
    for scores, factor in ((bound["input"], bound["other"]), (bound["other"], bound["input"])):
        step = _scale_of(factor, "mul")
        if step is not None and _full_shape(scores, node):
            steps.append((scores, step))
    return steps


def _divide_steps(node, bound, folder):
    step = _scale_of(bound["other"], "div") if bound["rounding_mode"] is None else None
    return [(bound["input"], step)] if step is not None and _full_shape(bound["input"], node) else []


def _add_steps(node, bound, folder):
    if bound["alpha"] != 1:
        return []
    first, second = bound["input"], bound["other"]
    return [(scores, _Step(mask=MaskTerm(term, ADDITIVE)))
            for scores, term in ((first, second), (second, first)) if _full_shape(scores, node)]


def _subtract_steps(node, bound, folder):
    if bound["alpha"] != 1 or not _full_shape(bound["input"], node):
        return []
    return [(bound["input"], _Step(mask=MaskTerm(bound["other"], SUBTRACTED)))]


def _masked_fill_steps(node, bound, folder):
    if is_very_negative(bound["value"], folder):
        return [(bound["input"], _Step(mask=MaskTerm(bound["mask"], MASKED, _replacing_fill(bound["value"], folder))))]
    return [(bound["input"], _Step(unsupported=f"masked_fill sets scores to {bound['value']!r}, not to a "
                                               "very negative value (not a mask)"))]


def _where_steps(node, bound, folder):
    if "input" not in bound or "other" not in bound:
        return []
    condition, kept, removed = bound["condition"], bound["input"], bound["other"]
    if is_very_negative(removed, folder) and _full_shape(kept, node):
        return [(kept, _Step(mask=MaskTerm(condition, ATTEND, _replacing_fill(removed, folder))))]
    if is_very_negative(kept, folder) and _full_shape(removed, node):
        return [(removed, _Step(mask=MaskTerm(condition, MASKED, _replacing_fill(kept, folder))))]
    return []


def _replacing_fill(value, folder):
    """The fill of a mask that replaces scores (masked_fill / where on the scores): a finite one
    sets every removed score to the same value, whatever the score, so a row that removes every
    key is a plain average. As an additive mask that is the most negative float (the replacement
    clamps it to the mask's dtype), which rounds every score away as the replacement did."""
    return None if removal_fill(value, folder) is None else -sys.float_info.max


# Read top to bottom: the first rule whose spelling matches says where the scores came from.
SCORE_RULES = (
    (CAST, _cast_steps),
    (MULTIPLY, _multiply_steps),
    (DIVIDE, _divide_steps),
    (ADD, _add_steps),
    (SUBTRACT, _subtract_steps),
    (MASKED_FILL, _masked_fill_steps),
    (WHERE, _where_steps),
    (WHERE_METHOD, _where_steps),
)

# Unknown ops (tanh soft-capping, clamp, ...) the walk may pass through to still find and report a site.
_UNKNOWN_OPS_ALLOWED = 2


def _full_shape(operand: Any, node: torch.fx.Node) -> bool:
    shape, full = shape_of(operand), shape_of(node)
    return shape is not None and full is not None and same_shape(shape, full)


def _same_matrix(operand: Any, node: torch.fx.Node) -> bool:
    """Same (n_q, n_k) trailing axes: an elementwise op, or a reshape of the batch axes only."""
    shape, full = shape_of(operand), shape_of(node)
    return (shape is not None and full is not None and len(shape) >= 2 and len(full) >= 2
            and same_shape(shape[-2:], full[-2:]))


# ---------------------------------------------------------------------------------------------
# Shapes of the products


def _last_two_swapped(node: Any) -> torch.fx.Node | None:
    """X when node is X with its last two axes swapped (transpose, permute, .mT, .t())."""
    if is_getattr_mT(node) and node.args[1] == "mT":
        return node.args[0]
    shape = shape_of(node)
    if shape is None or len(shape) < 2:
        return None
    ndim = len(shape)
    if bound := match(node, TRANSPOSE):
        dims = {normalize_dim(bound["dim0"], ndim), normalize_dim(bound["dim1"], ndim)}
        return bound["input"] if dims == {ndim - 2, ndim - 1} else None
    if bound := match(node, PERMUTE):
        dims = [normalize_dim(d, ndim) for d in bound["dims"]]
        return bound["input"] if dims == [*range(ndim - 2), ndim - 1, ndim - 2] else None
    if (bound := match(node, MATRIX_TRANSPOSE)) and ndim == 2:
        return bound["input"]
    return None


@dataclass
class _Product:
    spelling: str
    q: TensorRecipe | None
    k: TensorRecipe | None
    scale: float = 1.0
    owned: list = field(default_factory=list)  # input-side nodes only this product reads
    masks: list = field(default_factory=list)  # an additive term computed by the product (baddbmm)
    problem: str = ""


def _einsum_operands(bound: dict) -> list:
    return list(bound.get("operands", ()))


def _used_only_by(node: Any, user: torch.fx.Node) -> bool:
    return isinstance(node, torch.fx.Node) and set(node.users) == {user}


# ---------------------------------------------------------------------------------------------
# The finder


class _SiteFinder:
    def __init__(self, gm: torch.fx.GraphModule, folder: ConstantFolder | None = None):
        self.gm = gm
        self.folder = ConstantFolder(gm) if folder is None else folder
        self.dataflow = dataflow_graph(gm.graph)
        self.live = live_nodes(gm.graph)
        self._masks: dict[tuple, MaskClassification] = {}

    def _classify(self, terms: list, scores_shape: tuple, is_causal: bool = False) -> MaskClassification:
        # Every layer of a model usually shares one mask: prove it once.
        key = (tuple(terms), tuple(map(str, scores_shape)), is_causal)
        if key not in self._masks:
            self._masks[key] = classify_mask(terms, scores_shape, self.folder, is_causal=is_causal)
        return self._masks[key]

    # -- operands ---------------------------------------------------------------------------

    def _is_weight(self, node: Any) -> bool:
        """Does the operand come (through views only) from a parameter or a constant?"""
        while isinstance(node, torch.fx.Node):
            if node.op in ("get_attr", "placeholder"):
                return node.op == "get_attr" or self.folder.is_parameter(node) or self.folder.is_constant(node)
            bound = (match(node, VIEW_LIKE) or match(node, CAST) or match(node, TRANSPOSE)
                     or match(node, PERMUTE) or match(node, GETITEM))
            if bound is None and is_getattr_mT(node):
                bound = {"input": node.args[0]}
            if bound is None:
                return self.folder.is_constant(node)
            node = bound["input"]
        return False

    def _is_qk_product(self, node: torch.fx.Node) -> bool:
        if bound := match(node, MATMUL):
            operands = [bound["input"], bound["other"]]
        elif bound := match(node, BADDBMM):
            operands = [bound["batch1"], bound["batch2"]]
        elif bound := match(node, EINSUM):
            operands = _einsum_operands(bound)
            if len(operands) != 2:
                return False
        else:
            return False
        shapes = [shape_of(operand) for operand in operands]
        if any(shape is None or len(shape) < 2 for shape in shapes):
            return False
        return not any(self._is_weight(operand) for operand in operands)

    def _walk_scores(self, node: Any, unknown_allowed: int) -> _ScoreWalk | None:
        """Walk from the softmax input back to Q Kᵀ; None when this is not attention."""
        if not isinstance(node, torch.fx.Node):
            return None
        if self._is_qk_product(node):
            return _ScoreWalk(product=node)
        for table, steps_of in SCORE_RULES:
            bound = match(node, table)
            if bound is None:
                continue
            for source, step in steps_of(node, bound, self.folder):
                walk = self._walk_scores(source, unknown_allowed - (step.unsupported is not None))
                if walk is not None:
                    walk.add(node, step)
                    return walk
            break
        else:
            tensors = [arg for arg in node.all_input_nodes if is_tensor(arg)]
            if unknown_allowed > 0 and len(tensors) == 1 and _same_matrix(tensors[0], node):
                walk = self._walk_scores(tensors[0], unknown_allowed - 1)
                if walk is not None:
                    walk.add(node, _Step(unsupported=f"the scores pass through {describe(node)} between "
                                                     "Q Kᵀ and the softmax; supported: scale, mask, casts"))
                    return walk
        return None

    def _read_qk(self, product: torch.fx.Node) -> _Product:
        matmul, baddbmm = match(product, MATMUL), match(product, BADDBMM)
        if matmul or baddbmm:
            if baddbmm:
                queries, keys_t = baddbmm["batch1"], baddbmm["batch2"]
                result = _Product("baddbmm", None, None)
                result.problem = _baddbmm_problem(baddbmm)
                if baddbmm["beta"] != 0:
                    result.masks.append(MaskTerm(baddbmm["input"], ADDITIVE))
            else:
                queries, keys_t = matmul["input"], matmul["other"]
                result = _Product("bmm" if product.target in (torch.bmm, "bmm") else "matmul", None, None)
            keys = _last_two_swapped(keys_t)
            if keys is not None:
                result.k = TensorRecipe(keys)
                if _used_only_by(keys_t, product):
                    result.owned.append(keys_t)
            else:
                result.k = TensorRecipe(keys_t, transpose_last_two=True)
            if baddbmm and is_number(baddbmm["alpha"]):
                result.scale = float(baddbmm["alpha"])
            # A number multiplying q before the product belongs to the softmax scale.
            peeled = self._peel_number(queries)
            if peeled is not None:
                unscaled, scale = peeled
                result.scale *= scale
                if _used_only_by(queries, product):
                    result.owned.append(queries)
                queries = unscaled
            result.q = TensorRecipe(queries)
            return result
        bound = match(product, EINSUM)
        operands = _einsum_operands(bound)
        try:
            layout = read_scores_einsum(bound["equation"], [len(shape_of(op)) for op in operands])
        except EinsumLayoutError as error:
            return _Product("einsum", None, None, problem=str(error))
        return _Product("einsum", TensorRecipe(operands[layout.q_operand], permute=layout.q_permute),
                        TensorRecipe(operands[1 - layout.q_operand], permute=layout.k_permute))

    def _peel_number(self, node: Any) -> tuple[torch.fx.Node, float] | None:
        if bound := match(node, MULTIPLY):
            for tensor, number in ((bound["input"], bound["other"]), (bound["other"], bound["input"])):
                if is_number(number) and _full_shape(tensor, node):
                    return tensor, float(number)
        if (bound := match(node, DIVIDE)) and bound["rounding_mode"] is None:
            if is_number(bound["other"]) and bound["other"] != 0 and _full_shape(bound["input"], node):
                return bound["input"], 1.0 / bound["other"]
        return None

    # -- forward from the softmax ----------------------------------------------------------

    def _walk_weights(self, softmax: torch.fx.Node) -> tuple[list, torch.fx.Node | None, list]:
        """(nodes after the softmax, the product with V or None, problems) following casts and dropout."""
        nodes, problems = [], []
        current = softmax
        while True:
            following = None
            for user in current.users:
                if (bound := match(user, CAST)) and bound["input"] is current:
                    following = user
                elif (bound := match(user, DROPOUT)) and bound["input"] is current:
                    following = user
                    problem = _dropout_problem(bound)
                    if problem:
                        problems.append(problem)
                elif self._is_weights_product(user, current):
                    return nodes, user, problems
                elif match(user, VIEW_LIKE) and _same_matrix(current, user):
                    following = user
                    problems.append(f"the attention weights are reshaped ({describe(user)}) before the "
                                    "product with V; supported: casts and dropout")
                if following is not None:
                    break
            if following is None:
                return nodes, None, problems
            nodes.append(following)
            current = following

    def _is_weights_product(self, node: torch.fx.Node, weights: torch.fx.Node) -> bool:
        if bound := match(node, MATMUL):
            return bound["input"] is weights and bound["other"] is not weights and is_tensor(bound["other"])
        if bound := match(node, EINSUM):
            operands = _einsum_operands(bound)
            return len(operands) == 2 and operands.count(weights) == 1
        return False

    def _read_pv(self, product: torch.fx.Node, weights: torch.fx.Node
                 ) -> tuple[TensorRecipe | None, tuple | None, str]:
        if bound := match(product, MATMUL):
            return TensorRecipe(bound["other"]), None, ""
        bound = match(product, EINSUM)
        operands = _einsum_operands(bound)
        try:
            layout = read_output_einsum(bound["equation"], [len(shape_of(op)) for op in operands],
                                        operands.index(weights))
        except EinsumLayoutError as error:
            return None, None, str(error)
        values = operands[1 - operands.index(weights)]
        return TensorRecipe(values, permute=layout.v_permute), layout.output_permute, ""

    # -- sites ----------------------------------------------------------------------------

    def softmax_site(self, softmax: torch.fx.Node) -> AttentionSite | None:
        bound = match(softmax, SOFTMAX)
        scores = bound["input"]
        scores_shape = shape_of(scores)
        if scores_shape is None or len(scores_shape) < 2:
            return None
        walk = self._walk_scores(scores, _UNKNOWN_OPS_ALLOWED)
        if walk is None:
            return None
        problems = list(walk.unsupported)
        problems += _softmax_axis_problem(bound.get("dim"), len(scores_shape))

        product = self._read_qk(walk.product)
        if product.problem:
            problems.append(product.problem)
        after, weights_product, dropout_problems = self._walk_weights(softmax)
        problems += dropout_problems
        core = [walk.product, *product.owned, *walk.nodes, softmax, *after]
        roles = {node: "the scores" for node in [walk.product, *walk.nodes]}
        roles.update({node: "attention weights" for node in [softmax, *after]})
        if weights_product is None:
            problems.append("the softmax output is not multiplied by V (no matmul/bmm/einsum with the "
                            "attention weights)")
            output, values, output_permute = softmax, None, None
        else:
            output = weights_product
            core.append(output)
            weights = after[-1] if after else softmax
            values, output_permute, problem = self._read_pv(output, weights)
            if problem:
                problems.append(problem)

        mask = self._classify(walk.masks + product.masks, scores_shape)
        return self._site(
            name=softmax.name, spelling=f"{product.spelling}+softmax", output=output, core=core,
            roles=roles, queries=product.q, keys=product.k, values=values, mask=mask,
            scale=walk.scale * product.scale, factors=tuple(walk.factors), enable_gqa=False,
            output_permute=output_permute, scores_shape=scores_shape, problems=problems,
            scale_is_default=False,
        )

    def sdpa_site(self, node: torch.fx.Node) -> AttentionSite | None:
        bound = match(node, SDPA)
        queries, keys, values = bound["query"], bound["key"], bound["value"]
        q_shape, k_shape = shape_of(queries), shape_of(keys)
        if q_shape is None or k_shape is None:
            return None
        problems = []
        dropout_p, is_causal, scale = bound["dropout_p"], bound["is_causal"], bound["scale"]
        if isinstance(dropout_p, torch.fx.Node):
            problems.append(f"dropout_p is computed at run time ({describe(dropout_p)}); supported: 0.0"
                            + (DYNAMIC_FLOAT_HINT if dropout_p.target in ("item", torch.ops.aten.item.default)
                               or dropout_p.op == "placeholder" else ""))
        elif dropout_p:
            problems.append(f"dropout_p={dropout_p} drops attention weights; the fused replacement cannot "
                            "(supported: 0.0, e.g. the model in eval mode)")
        if not isinstance(is_causal, bool):
            problems.append(f"is_causal is computed at run time ({describe(is_causal)})")
            is_causal = False
        enable_gqa = bound["enable_gqa"]
        if not isinstance(enable_gqa, bool):
            problems.append(f"enable_gqa is computed at run time ({describe(enable_gqa)})")
            enable_gqa = False
        factors: tuple = ()
        if isinstance(scale, torch.fx.Node):
            factors, scale = ((scale, "mul"),), 1.0

        attn_mask = bound["attn_mask"]
        terms = []
        if attn_mask is not None:
            terms.append(MaskTerm(attn_mask, ATTEND if dtype_of(attn_mask) is torch.bool else ADDITIVE))
        scores_shape = (*q_shape[:-1], k_shape[-2])
        mask = self._classify(terms, scores_shape, is_causal)
        return self._site(
            name=node.name, spelling="sdpa", output=node, core=[node], roles={}, queries=TensorRecipe(queries),
            keys=TensorRecipe(keys), values=TensorRecipe(values), mask=mask, scale=scale, factors=factors,
            enable_gqa=enable_gqa, output_permute=None, scores_shape=scores_shape, problems=problems,
            scale_is_default=scale is None,
        )

    def _site(self, *, name, spelling, output, core, roles, queries, keys, values, mask: MaskClassification,
              scale, factors, enable_gqa, output_permute, scores_shape, problems, scale_is_default
              ) -> AttentionSite:
        problems = list(problems)
        problems += escaping_uses(core, output, roles, self.live)
        if not is_convex(self.dataflow, core):
            problems.append("the matched subgraph is not convex (a value leaves it and flows back in)")
        if mask.kind == "general":
            problems.append(mask.reason)
        notes = []
        if factors:
            names = ", ".join(describe(node) for node, _ in factors)
            notes.append(f"run-time scale {names} folded into q")

        if queries is not None and keys is not None and values is not None:
            keys, values, enable_gqa, gqa_note = _unrepeat_heads(keys, values, enable_gqa)
            if gqa_note:
                notes.append(gqa_note)
            problems += _layout_problems(queries, keys, values, scores_shape, enable_gqa)
            if not enable_gqa and keys.shape() is not None and queries.shape() is not None:
                enable_gqa = broadcast_heads(queries.shape(), keys.shape())
                if enable_gqa:
                    notes.append(f"k/v have {size_label(keys.shape()[-3])} heads broadcast over "
                                 f"{size_label(queries.shape()[-3])} query heads: enable_gqa=True")
            compute_dtype, dtype_problem, dtype_note = _compute_dtype(queries, keys, values, output)
            problems += dtype_problem
            notes += dtype_note

        supported = not problems
        replacement = None
        if supported:
            output_dtype = dtype_of(output)
            input_dtype = compute_dtype or dtype_of(queries.node)
            replacement = Replacement(
                q=queries, k=keys, v=values, q_factors=factors, mask_terms=mask.key_padding,
                is_causal=mask.is_causal, scale=None if scale_is_default else float(scale),
                enable_gqa=enable_gqa, output_permute=output_permute,
                output_dtype=output_dtype if output_dtype != input_dtype else None, compute_dtype=compute_dtype,
            )
        return AttentionSite(
            name=name,
            module_path=module_path_of(core),
            spelling=spelling,
            output=output,
            nodes=frozenset(core),
            query_shape=shape_label(queries.shape()) if queries is not None else (),
            key_shape=shape_label(keys.shape()) if keys is not None else (),
            value_shape=shape_label(values.shape()) if values is not None else (),
            mask=mask.kind,
            is_causal=mask.is_causal,
            scale=None if scale_is_default else (float(scale) if is_number(scale) else None),
            supported=supported,
            reason="; ".join(dict.fromkeys(problems)),
            notes="; ".join(notes),
            device=device_type_of(queries.node) if queries is not None else "",
            replacement=replacement,
            masked_rows=mask.masked_rows,
        )


# transformers passes dropout=0.0 as a float attribute; with dynamic shapes Dynamo may make such a
# float a graph input (a tensor read by .item()), so the number is gone from the graph
DYNAMIC_FLOAT_HINT = ("; with dynamic shapes Dynamo passed a float attribute as a tensor: "
                      "torch._dynamo.config.specialize_float = True keeps it a number")


def _compute_dtype(queries: TensorRecipe, keys: TensorRecipe, values: TensorRecipe, output: torch.fx.Node
                   ) -> tuple[torch.dtype | None, list[str], list[str]]:
    """(the dtype to cast q, k, v to, problems, notes) where they arrive in different dtypes.

    Products of different dtypes trace only under autocast, which casts every operand of SDPA and
    of the matmuls to its dtype and computes the site in it: the site's output dtype. (Llama's
    rotary embedding, for one, turns bfloat16 projections into float32 q and k while v stays
    bfloat16.) The replacement casts q, k, v to that dtype, as autocast did; any other mix is kept.
    """
    dtypes = {dtype_of(queries.node), dtype_of(keys.node), dtype_of(values.node)}
    if len(dtypes) == 1:
        return None, [], []
    listed = ", ".join(sorted(map(str, dtypes)))
    computed = dtype_of(output)
    if computed in dtypes and computed is not None and computed.is_floating_point:
        return computed, [], [f"q, k, v in {listed} under autocast: cast to {computed}, the dtype it computed the site in"]
    return None, [f"q, k, v have different dtypes ({listed})"], []


def _softmax_axis_problem(dim: Any, ndim: int) -> list[str]:
    if dim is None:
        return ["softmax has no dim (implicit dim is deprecated and not the key axis)"]
    if not isinstance(dim, int):
        return [f"softmax dim is computed at run time ({describe(dim)})"]
    axis = normalize_dim(dim, ndim)
    if axis == ndim - 1:
        return []
    which = "the query axis" if axis == ndim - 2 else f"axis {dim}"
    return [f"softmax is over {which} (dim={dim}), not the key axis (dim=-1)"]


def _baddbmm_problem(bound: dict) -> str:
    if bound["beta"] in (0, 1) and is_number(bound["alpha"]):
        return ""
    return (f"baddbmm with beta={bound['beta']!r}, alpha={bound['alpha']!r}; supported: beta 0 or 1 and a "
            "number alpha")


def _dropout_problem(bound: dict) -> str:
    training, p = bound.get("training"), bound.get("p")
    if training is False:
        return ""
    if not isinstance(training, bool):
        return f"dropout on the attention weights has a run-time training flag ({describe(training)})"
    if is_number(p) and p == 0:
        return ""
    return (f"dropout (p={p}) is applied to the attention weights in training mode; the fused replacement "
            "cannot drop individual weights (call model.eval(), or set the attention dropout to 0)")


def _unrepeat_heads(keys: TensorRecipe, values: TensorRecipe, enable_gqa: bool):
    """Pass k/v heads un-repeated with enable_gqa=True when both were repeated the same way."""
    if enable_gqa or not (keys.is_plain and values.is_plain):
        return keys, values, enable_gqa, ""
    key_repeat, value_repeat = head_repeat(keys.node), head_repeat(values.node)
    if key_repeat is None or value_repeat is None or key_repeat[1] != value_repeat[1]:
        return keys, values, enable_gqa, ""
    return (TensorRecipe(key_repeat[0]), TensorRecipe(value_repeat[0]), True,
            f"k/v heads repeated x{key_repeat[1]}: passed un-repeated with enable_gqa=True")


def _layout_problems(queries: TensorRecipe, keys: TensorRecipe, values: TensorRecipe, scores_shape: tuple,
                     enable_gqa: bool) -> list[str]:
    q_shape, k_shape, v_shape = queries.shape(), keys.shape(), values.shape()
    if q_shape is None or k_shape is None or v_shape is None:
        return ["q, k or v has no shape metadata"]
    if len(q_shape) < 2 or len(k_shape) != len(q_shape) or len(v_shape) != len(q_shape):
        ranks = f"{len(q_shape)}, {len(k_shape)}, {len(v_shape)}"
        return [f"q, k, v have ranks {ranks}; supported: equal ranks ≥ 2"]
    if not same_shape(q_shape[:-1], tuple(scores_shape[:-1])):
        return [f"q {shape_label(q_shape)} is broadcast against k {shape_label(k_shape)} over batch axes; "
                "supported: q with the batch axes of the scores"]
    # The batch axes and length of k and v: SDPA and the product with V accept only equal ones.
    if not same_shape_by_contract(k_shape[:-1], v_shape[:-1]):
        return [f"k {shape_label(k_shape)} and v {shape_label(v_shape)} differ in batch axes or length"]
    if same_shape(k_shape[:-2], q_shape[:-2]):
        return []
    heads_only = len(q_shape) >= 3 and same_shape(k_shape[:-3], q_shape[:-3])
    q_heads, k_heads = q_shape[-3] if len(q_shape) >= 3 else None, k_shape[-3] if len(k_shape) >= 3 else None
    if heads_only and isinstance(q_heads, int) and isinstance(k_heads, int) and q_heads % k_heads == 0:
        return []
    if enable_gqa and heads_only:
        return []
    return [f"k {shape_label(k_shape)} does not match q {shape_label(q_shape)} in batch axes (only a head axis "
            "that divides q's, as in GQA/MQA, is supported)"]
