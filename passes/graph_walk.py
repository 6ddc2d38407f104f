"""The spellings of the operations an attention site is built from, and how to read FX nodes.

This module owns the *data* of matching: which FX node (function, method or module) spells a
softmax, a matmul, a cast, a dropout, a scale, a mask application, ... and which argument is
which. The matcher in `attention_sites.py` walks the graph asking `match(node, SOFTMAX)`; to
support a new spelling, add one `Spelling` row to the right table here.

    >>> match(node, SOFTMAX)          # node: `torch.nn.functional.softmax(x, dim=-1)`
    {'dim': -1, 'dtype': None, 'input': x}
    >>> match(node, SOFTMAX)          # node: `x.softmax(-1, dtype=torch.float32)`
    {'dtype': torch.float32, 'input': x, 'dim': -1}

It also owns reading shapes and dtypes from node metadata (`example_value` from Dynamo, `val`
from make_fx/export, `tensor_meta` from ShapeProp).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten


@dataclass(frozen=True)
class Spelling:
    """One way to write an operation in an FX graph.

    `params` names the positional parameters in order (a method's `self` first); `defaults`
    fills the ones a call may leave out. For `call_module`, `module_attrs` are read from the
    module instance (e.g. `nn.Softmax.dim`) and `training` from `module.training`.
    """

    op: str
    target: Any
    params: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    module_attrs: tuple[str, ...] = ()
    varargs: bool = False  # the parameters after the first are passed as *args (permute, view)


def _functions(targets, params, defaults=None):
    return tuple(Spelling("call_function", t, params, dict(defaults or {})) for t in targets)


def _methods(names, params, defaults=None, varargs=False):
    return tuple(
        Spelling("call_method", name, params, dict(defaults or {}), varargs=varargs) for name in names
    )


SOFTMAX = (
    *_functions([F.softmax], ("input", "dim", "_stacklevel", "dtype"), {"dim": None, "dtype": None}),
    *_functions([torch.softmax, torch.special.softmax], ("input", "dim", "dtype"), {"dtype": None}),
    *_methods(["softmax"], ("input", "dim", "dtype"), {"dtype": None}),
    *_functions([torch._softmax, aten._softmax.default], ("input", "dim", "half_to_float")),
    *_functions([aten.softmax.int], ("input", "dim", "dtype"), {"dtype": None}),
    Spelling("call_module", nn.Softmax, ("input",), module_attrs=("dim",)),
)

# Value-preserving ops: the result holds the same numbers, maybe in another dtype or memory layout.
CAST = (
    *_methods(["to", "type", "type_as"], ("input", "dtype")),
    *_methods(["float", "double", "half", "bfloat16", "contiguous", "clone"], ("input",)),
)

DROPOUT = (
    *_functions(
        [F.dropout], ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False}
    ),
    *_functions([torch.dropout, aten.dropout.default], ("input", "p", "training")),
    Spelling("call_module", nn.Dropout, ("input",), module_attrs=("p",)),
)

MATMUL = (
    *_functions([operator.matmul, torch.matmul, torch.bmm, aten.bmm.default, aten.matmul.default],
                ("input", "other")),
    *_methods(["matmul", "bmm", "__matmul__"], ("input", "other")),
)

# beta * input + alpha * (batch1 @ batch2): Bloom's ALiBi scores in one call.
BADDBMM = (
    *_functions([torch.baddbmm], ("input", "batch1", "batch2", "beta", "alpha"), {"beta": 1, "alpha": 1}),
    *_methods(["baddbmm"], ("input", "batch1", "batch2", "beta", "alpha"), {"beta": 1, "alpha": 1}),
)

EINSUM = (Spelling("call_function", torch.einsum, ("equation", "operands"), varargs=True),)

# `scores *= scale` reaches the graph as operator.imul; on a value nobody else reads it is a mul.
MULTIPLY = (
    *_functions([operator.mul, operator.imul, torch.mul, aten.mul.Tensor], ("input", "other")),
    *_methods(["mul", "__mul__", "__rmul__"], ("input", "other")),
)

DIVIDE = (
    *_functions([operator.truediv, operator.itruediv, torch.div, torch.true_divide, aten.div.Tensor],
                ("input", "other", "rounding_mode"), {"rounding_mode": None}),
    *_methods(["div", "true_divide", "__truediv__"], ("input", "other", "rounding_mode"),
              {"rounding_mode": None}),
)

# `scores += mask` reaches the graph as operator.iadd; on a value nobody else reads it is an add.
ADD = (
    *_functions([operator.add, operator.iadd, torch.add, aten.add.Tensor], ("input", "other", "alpha"),
                {"alpha": 1}),
    *_methods(["add", "__add__", "__radd__", "add_"], ("input", "other", "alpha"), {"alpha": 1}),
)

SUBTRACT = (
    *_functions([operator.sub, operator.isub, torch.sub, aten.sub.Tensor], ("input", "other", "alpha"),
                {"alpha": 1}),
    *_methods(["sub", "__sub__", "sub_"], ("input", "other", "alpha"), {"alpha": 1}),
)

MASKED_FILL = (
    *_functions([torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor],
                ("input", "mask", "value")),
    *_methods(["masked_fill", "masked_fill_"], ("input", "mask", "value")),
)

# torch.where(condition, input, other); the method spelling is input.where(condition, other).
WHERE = (*_functions([torch.where, aten.where.self], ("condition", "input", "other")),)
WHERE_METHOD = (*_methods(["where"], ("input", "condition", "other")),)

TRANSPOSE = (
    *_functions([torch.transpose, torch.swapaxes, torch.swapdims, aten.transpose.int],
                ("input", "dim0", "dim1")),
    *_methods(["transpose", "swapaxes", "swapdims"], ("input", "dim0", "dim1")),
)
PERMUTE = (
    *_functions([torch.permute, aten.permute.default], ("input", "dims")),
    *_methods(["permute"], ("input", "dims"), varargs=True),
)
MATRIX_TRANSPOSE = (
    *_functions([torch.t], ("input",)),
    *_methods(["t"], ("input",)),
)
# Ops that only reshape or re-view a tensor's data: used to see that an operand is a weight.
VIEW_LIKE = (
    *_methods(["view", "reshape", "expand", "flatten", "unflatten", "squeeze", "unsqueeze"], ("input", "args"),
              varargs=True),
    *_functions([torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze], ("input", "args")),
)

REPEAT_INTERLEAVE = (
    *_functions([torch.repeat_interleave], ("input", "repeats", "dim", "output_size"),
                {"dim": None, "output_size": None}),
    *_methods(["repeat_interleave"], ("input", "repeats", "dim", "output_size"),
              {"dim": None, "output_size": None}),
)
EXPAND = (*_methods(["expand"], ("input", "sizes"), varargs=True),)
RESHAPE = (
    *_methods(["reshape", "view"], ("input", "shape"), varargs=True),
    *_functions([torch.reshape], ("input", "shape")),
)
UNSQUEEZE = (
    *_functions([torch.unsqueeze], ("input", "dim")),
    *_methods(["unsqueeze"], ("input", "dim")),
)
GETITEM = (*_functions([operator.getitem], ("input", "index")),)

SDPA = (
    *_functions(
        [F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default],
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    ),
)

# Boolean algebra used by masks (attend = a AND b; masked = a OR b; NOT flips).
LOGICAL_AND = (
    *_functions([operator.and_, operator.iand, torch.logical_and, torch.bitwise_and], ("input", "other")),
    *_methods(["logical_and", "bitwise_and", "__and__", "__iand__"], ("input", "other")),
)
LOGICAL_OR = (
    *_functions([operator.or_, operator.ior, torch.logical_or, torch.bitwise_or], ("input", "other")),
    *_methods(["logical_or", "bitwise_or", "__or__", "__ior__"], ("input", "other")),
)
LOGICAL_NOT = (
    *_functions([operator.invert, torch.logical_not, torch.bitwise_not], ("input",)),
    *_methods(["logical_not", "bitwise_not", "__invert__"], ("input",)),
)
# Ops that only broadcast or move a mask: its value at every (query, key) is unchanged.
BROADCAST = (
    *_methods(["expand", "expand_as", "broadcast_to"], ("input", "sizes"), varargs=True),
    *_functions([torch.broadcast_to], ("input", "size")),
    *_methods(["contiguous", "clone"], ("input",)),
)


def _module_of(node: torch.fx.Node) -> nn.Module | None:
    owner = node.graph.owning_module
    if owner is None:
        return None
    try:
        return owner.get_submodule(node.target)
    except AttributeError:
        return None


def _matches_target(node: torch.fx.Node, spelling: Spelling) -> bool:
    if node.op != spelling.op:
        return False
    if node.op == "call_module":
        module = _module_of(node)
        return module is not None and isinstance(module, spelling.target)
    return node.target is spelling.target or node.target == spelling.target


def bind(node: torch.fx.Node, spelling: Spelling) -> dict[str, Any]:
    """The node's arguments by parameter name, with defaults filled in."""
    args = list(node.args)
    if spelling.varargs:
        fixed = len(spelling.params) - 1
        rest = args[fixed:]
        # permute(0, 2, 1, 3) and permute((0, 2, 1, 3)) mean the same.
        if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
            rest = list(rest[0])
        args = args[:fixed] + ([tuple(rest)] if rest else [])
    bound = dict(spelling.defaults)
    bound.update(zip(spelling.params, args))
    bound.update(node.kwargs)
    if spelling.op == "call_module":
        module = _module_of(node)
        for attr in spelling.module_attrs:
            bound[attr] = getattr(module, attr)
        bound["training"] = module.training
    return bound


def match(node: Any, table: tuple[Spelling, ...]) -> dict[str, Any] | None:
    """`bind(node, spelling)` for the first spelling of `table` that node is written in, else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    for spelling in table:
        if _matches_target(node, spelling):
            return bind(node, spelling)
    return None


def is_getattr_mT(node: Any) -> bool:
    """`x.mT` reaches Dynamo graphs as call_function getattr(x, "mT")."""
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in ("mT", "mH")
    )


# ---------------------------------------------------------------------------------------------
# Reading metadata


def example_value(node: Any) -> Any:
    """The (fake) value a node produced while tracing, or None when the graph carries none."""
    if not isinstance(node, torch.fx.Node):
        return node
    for key in ("example_value", "val"):
        if key in node.meta:
            return node.meta[key]
    return None


def is_tensor(node: Any) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if isinstance(example_value(node), torch.Tensor):
        return True
    return "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def shape_of(node: Any) -> tuple | None:
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return value.dtype
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return getattr(meta, "dtype", None)


def device_type_of(node: Any) -> str:
    """"cpu", "cuda", ... of the node's example value; "" when the graph does not say."""
    value = example_value(node)
    return value.device.type if isinstance(value, torch.Tensor) else ""


def numel_is_one(node: Any) -> bool:
    shape = shape_of(node)
    return shape is not None and all(_is_one(size) for size in shape)


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_symbolic_scalar(node: Any) -> bool:
    """A node whose value is a Python number known only at run time (SymInt/SymFloat, `.item()`)."""
    return isinstance(node, torch.fx.Node) and isinstance(
        example_value(node), (torch.SymInt, torch.SymFloat, int, float)
    )


def same_size(a: Any, b: Any) -> bool:
    """Sizes equal for every shape the graph can run with (symbolic sizes included), no guard added."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def same_size_by_contract(a: Any, b: Any) -> bool:
    """Sizes that an op of the graph itself requires to be equal (SDPA's key and value lengths, the
    axes a matmul broadcasts). Dynamo gives each input its own symbol on an automatic-dynamic
    recompile, and SDPA's shape rules do not unify them (`torch.cat` onto a KV cache gives k
    `s1 + 1` and v `s2 + 1`), so `same_size` cannot prove them equal. Evaluating the equality
    instead records it as a guard: inputs where the sizes differ, which the op would reject anyway,
    recompile rather than reach a replacement that assumed them equal."""
    if same_size(a, b):
        return True
    if not isinstance(a, (int, torch.SymInt)) or not isinstance(b, (int, torch.SymInt)):
        return False
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    try:
        return bool(a == b)
    except GuardOnDataDependentSymNode:  # data-dependent sizes have no value to decide on
        return False


def same_shape_by_contract(a: tuple, b: tuple) -> bool:
    """`same_size_by_contract` on every axis (see there)."""
    return len(a) == len(b) and all(same_size_by_contract(x, y) for x, y in zip(a, b))


def size_label(size: Any) -> int | str:
    return size if isinstance(size, int) else str(size)


def shape_label(shape: tuple | None) -> tuple:
    return tuple(size_label(size) for size in shape) if shape is not None else ()


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def describe(node: Any) -> str:
    """A short user-facing name of a node: `name` (op target)."""
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "output":
        return "the graph output"
    target = node.target
    if node.op == "call_function":
        target = getattr(target, "__name__", str(target))
    return f"`{node.name}` ({target})"


# Dynamo names a module by the Python expression that reached it from the compiled frame
# (`torch._dynamo.source`): `L['self'].h.0.attn`, or `L['args'][0].model.layers.0.self_attn` when a
# decorator's `(*args, **kwargs)` wrapper is the frame (transformers 5's *ForCausalLM), or
# `L['kwargs']['model']...`, `G['model']...`. The frame's argument, with any indexing into it, is
# the root; the attribute steps after it are the path named_modules() gives.
_SOURCE_ROOT = re.compile(r"""^(?:[LG]|SYNTHETIC_LOCAL)\[(?:'[^']*'|"[^"]*")\](?:\[(?:-?\d+|'[^']*'|"[^"]*")\])*""")
_GETATTR = re.compile(r"getattr\(([^()]*), '([^']*)'\)")  # a member that is not an identifier
_PATH_STEPS = [
    (re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]"), r".\1"),
    (re.compile(r"\['([^']*)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
]


def module_path_from_source(source: str) -> str:
    """`model.layers.0.self_attn` from Dynamo's `L['args'][0].model.layers.0.self_attn` ('' for the root)."""
    while (unwrapped := _GETATTR.sub(r"\1.\2", source)) != source:
        source = unwrapped
    path = _SOURCE_ROOT.sub("", source)
    for pattern, replacement in _PATH_STEPS:
        path = pattern.sub(replacement, path)
    return path.lstrip(".")


def _module_stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(key, path) of every module the node was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, module_path_from_source(source)) for key, (source, _) in stack.items()]


def module_path_of(nodes) -> str:
    """The deepest module every node was traced inside, as `h.0.attn` ('' for the root)."""
    stacks = [_module_stack(n) for n in nodes]
    if not stacks:
        return ""
    common = stacks[0]
    for stack in stacks[1:]:
        depth = 0
        while depth < min(len(common), len(stack)) and common[depth] == stack[depth]:
            depth += 1
        common = common[:depth]
    return common[-1][1] if common else ""


def module_paths(graph: torch.fx.Graph) -> set[str]:
    """Every module path the graph was traced through, with its parents (ModuleLists are never
    called, yet `h` is a module too); '' for the root."""
    paths = {""}
    for node in graph.nodes:
        for _, path in _module_stack(node):
            parts = path.split(".") if path else []
            paths.update(".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return paths
