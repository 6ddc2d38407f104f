"""Which graph values depend only on constants and shapes, and computing them.

A mask is proven causal by computing it, never by recognising how it was written: the part of
the graph that builds it from literals, buffers and sizes (no runtime input's *data*) is run on
real tensors and the result is compared with the pattern. This module decides what that part is
and runs it.

    # Dynamo graph (transformers' masking_utils)           is_constant  evaluate
    q_idx = torch.arange(8)[None, None, :, None]           yes          tensor (1, 1, 8, 1)
    kv_idx = torch.arange(8)[None, None, None, :]           yes          tensor (1, 1, 1, 8)
    causal = kv_idx <= q_idx                               yes          lower-triangular bool
    padding = attention_mask[batch_idx, kv_idx]            no (input)   -

Constant sources: literals, factory calls (`arange`, `ones`, `tril`, ...), `get_attr` tensors that
are not parameters, and placeholders Dynamo lifted from module buffers or plain tensor attributes
(their current value is read from `node.meta["grapharg"]`). A buffer is thus taken at its value at
compile time: a model that rewrites its causal buffer after compiling must recompile. Sizes count
as constants too: a runtime tensor used only for its shape, dtype or device (`x.size(1)`,
`x.new_ones(())`, `torch.ones_like(x)`) is replaced by zeros of that shape. With dynamic shapes,
`evaluate` takes the value of every size symbol from `sizes` (default: the sizes it was traced
with), so a caller can re-check a mask at other sizes.

Inside the body of a wrapping higher-order op (activation checkpointing, see `higher_order.py`)
a placeholder stands for what the calls pass from the enclosing graph: the folder of a body is
built with those `bindings` and the `enclosing` folder, decides and computes a bound placeholder
there, and answers for nodes of enclosing graphs by asking their own folder. A causal buffer, or
a mask built before the checkpointed block, is thus proven as if it were built inside it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from passes.graph_walk import example_value

# Methods and functions that read only the metadata (shape, dtype, device) of their first argument.
_METADATA_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "new_ones", "new_zeros", "new_full", "new_tensor",
    "is_floating_point", "is_complex", "get_device", "element_size",
})
_METADATA_FUNCTIONS = frozenset({
    torch.ones_like, torch.zeros_like, torch.full_like, torch.numel,
    torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
})
_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})

# Producers whose result is not a function of their arguments: never constants.
_NONDETERMINISTIC_WORDS = ("rand", "bernoulli", "dropout", "normal", "empty", "multinomial",
                           "uniform", "exponential", "poisson")


class CannotEvaluate(Exception):
    """A value that looked constant could not be computed (freed buffer, unsupported op, bad size)."""


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_metadata_read(node: torch.fx.Node) -> bool:
    """True when the node's first argument is used only for its shape/dtype/device."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) == 2 and node.args[1] in _METADATA_ATTRIBUTES
        return node.target in _METADATA_FUNCTIONS
    return False


def _source_chain(source: Any) -> list[tuple[str, Any]]:
    chain = []
    while source is not None:
        chain.append((type(source).__name__, getattr(source, "member", getattr(source, "index", None))))
        source = getattr(source, "base", None)
    return chain


def _placeholder_is_constant(node: torch.fx.Node) -> bool:
    value = example_value(node)
    if isinstance(value, (torch.SymInt, torch.SymBool, int, bool)):
        return True  # a size symbol: constant in the data, fixed per evaluation
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return False
    if isinstance(getattr(grapharg, "example", None), nn.Parameter):
        return False
    chain = _source_chain(getattr(grapharg, "source", None))
    members = [member for _, member in chain]
    if "_parameters" in members:
        return False
    if "_buffers" in members:
        return True
    # A plain tensor attribute of a module (self.mask = torch.tril(...)) or a global tensor.
    kinds = [kind for kind, _ in chain]
    return any("NNModule" in kind for kind in kinds) or (bool(kinds) and kinds[-1].startswith("Global"))


def is_parameter(node: torch.fx.Node) -> bool:
    """A module parameter, as a `get_attr` or as a placeholder Dynamo lifted from `_parameters`."""
    if node.op == "get_attr":
        owner = node.graph.owning_module
        return owner is not None and isinstance(_fetch_attr(owner, node.target), nn.Parameter)
    if node.op != "placeholder":
        return False
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return False
    if isinstance(getattr(grapharg, "example", None), nn.Parameter):
        return True
    return "_parameters" in [member for _, member in _source_chain(getattr(grapharg, "source", None))]


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


class ConstantFolder:
    """Decides and computes the values of a graph that depend only on constants and sizes."""

    def __init__(self, gm: torch.fx.GraphModule, bindings: dict | None = None,
                 enclosing: "ConstantFolder | None" = None):
        self.gm = gm
        # A body's placeholder -> what each call passes for it, values of the enclosing graph.
        self.bindings: dict[torch.fx.Node, list] = dict(bindings or {})
        self.enclosing = enclosing
        self._constant: dict[torch.fx.Node, bool] = {}
        self._symbols: dict[torch.fx.Node, frozenset] = {}
        self.traced_sizes = self._traced_sizes()
        self._values: dict[tuple, dict[torch.fx.Node, Any]] = {}
        self._decide_all()

    # -- deciding --------------------------------------------------------------------------

    def is_constant(self, node: Any) -> bool:
        if not isinstance(node, torch.fx.Node):
            return True
        return self._folder_of(node)._constant.get(node, False)

    def is_parameter(self, node: Any) -> bool:
        """`is_parameter`, seeing through a body's placeholder to what every call passes."""
        if not isinstance(node, torch.fx.Node):
            return False
        folder = self._folder_of(node)
        if node in folder.bindings:
            return all(folder.enclosing.is_parameter(value) for value in folder.bindings[node])
        return is_parameter(node)

    def bound_value(self, node: Any) -> Any:
        """The node of an enclosing graph that every call passes for this body placeholder, else None."""
        if not isinstance(node, torch.fx.Node):
            return None
        passed = self._folder_of(node).bindings.get(node, [])
        if passed and isinstance(passed[0], torch.fx.Node) and all(value is passed[0] for value in passed):
            return passed[0]
        return None

    def _folder_of(self, node: torch.fx.Node) -> "ConstantFolder":
        """The folder of the graph holding `node`: this one or an enclosing one."""
        folder = self
        while node.graph is not folder.gm.graph and folder.enclosing is not None:
            folder = folder.enclosing
        return folder if node.graph is folder.gm.graph else self

    def size_symbols(self, node: Any) -> frozenset:
        """The size symbols (sympy) a constant value depends on; empty for static shapes."""
        if not isinstance(node, torch.fx.Node):
            return frozenset()
        return self._folder_of(node)._symbols.get(node, frozenset())

    def _decide_all(self) -> None:
        # One pass in graph order: every input is decided before its users, no recursion.
        for node in self.gm.graph.nodes:
            self._constant[node] = self._decide(node)
            symbols: set = set()
            value = example_value(node)
            if node.op == "placeholder" and isinstance(value, (torch.SymInt, torch.SymBool)):
                symbols |= value.node.expr.free_symbols
            for passed in self.bindings.get(node, ()):
                symbols |= self.enclosing.size_symbols(passed)
            for arg in node.all_input_nodes:
                if _is_metadata_read(node) and arg is node.args[0]:
                    symbols |= _shape_symbols(arg)
                else:
                    symbols |= self._symbols.get(arg, frozenset())
            self._symbols[node] = frozenset(symbols)

    def _decide(self, node: torch.fx.Node) -> bool:
        if node in self.bindings:
            return all(self.enclosing.is_constant(value) for value in self.bindings[node])
        if node.op == "placeholder":
            return _placeholder_is_constant(node)
        if node.op == "get_attr":
            return not isinstance(_fetch_attr(self.gm, node.target), nn.Parameter)
        if node.op not in ("call_function", "call_method"):
            return False
        name = _target_name(node).lower()
        if any(word in name for word in _NONDETERMINISTIC_WORDS):
            return False
        data_inputs = node.all_input_nodes
        if _is_metadata_read(node):
            data_inputs = [n for n in data_inputs if n is not node.args[0]]
        return all(self._constant.get(n, False) for n in data_inputs)

    # -- computing --------------------------------------------------------------------------

    def _traced_sizes(self) -> dict:
        for node in self.gm.graph.nodes:
            for size in _sizes_in(example_value(node)):
                shape_env = getattr(size.node, "shape_env", None)
                if shape_env is not None:
                    values = getattr(shape_env, "backed_var_to_val", None)
                    values = shape_env.var_to_val if values is None else values
                    return {symbol: int(value) for symbol, value in values.items()}
        return {}

    def evaluate(self, node: Any, sizes: dict | None = None) -> Any:
        """The value of a constant node, computed on real tensors; `sizes` maps size symbols to ints."""
        if isinstance(node, torch.fx.Node) and self._folder_of(node) is not self:
            return self._folder_of(node).evaluate(node, sizes)
        sizes = self.traced_sizes if sizes is None else sizes
        key = tuple(sorted((str(symbol), value) for symbol, value in sizes.items()))
        memo = self._values.setdefault(key, {})
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            try:
                return self._evaluate(node, sizes, memo)
            except CannotEvaluate:
                raise
            except Exception as error:  # any failure of a user's mask code means "not proven"
                raise CannotEvaluate(f"{type(error).__name__}: {error}") from error

    def _evaluate(self, node: Any, sizes: dict, memo: dict) -> Any:
        if not isinstance(node, torch.fx.Node):
            return node
        if node in memo:
            return memo[node]
        if not self.is_constant(node):
            raise CannotEvaluate(f"`{node.name}` depends on a runtime input")
        value = self._compute(node, sizes, memo)
        memo[node] = value
        return value

    def _compute(self, node: torch.fx.Node, sizes: dict, memo: dict) -> Any:
        if node in self.bindings:
            return self._bound_value(node, sizes)
        if node.op == "placeholder":
            traced = example_value(node)
            if isinstance(traced, (torch.SymInt, torch.SymBool)):
                return concrete(traced, sizes)
            real = getattr(node.meta.get("grapharg"), "example", None)
            if not isinstance(real, torch.Tensor):
                raise CannotEvaluate(f"the value of `{node.name}` is not available at compile time")
            return real.detach().clone()  # evaluation may run in-place ops; never touch the model
        if node.op == "get_attr":
            value = _fetch_attr(self.gm, node.target)
            return value.detach().clone() if isinstance(value, torch.Tensor) else value

        def value_of(arg: torch.fx.Node) -> Any:
            return self._evaluate(arg, sizes, memo)

        first = node.args[0] if node.args else None
        if _is_metadata_read(node) and isinstance(first, torch.fx.Node) and not self.is_constant(first):
            args = (self._stand_in(first, sizes), *torch.fx.node.map_arg(tuple(node.args[1:]), value_of))
        else:
            args = torch.fx.node.map_arg(node.args, value_of)
        kwargs = torch.fx.node.map_arg(node.kwargs, value_of)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _bound_value(self, node: torch.fx.Node, sizes: dict) -> Any:
        values = [self.enclosing.evaluate(value, sizes) for value in self.bindings[node]]
        first = values[0]
        for other in values[1:]:
            same = (torch.equal(first, other) if isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor)
                    else first == other)
            if not same:
                raise CannotEvaluate(f"the calls of this body pass different values for `{node.name}`")
        # Evaluation may run in-place ops; the enclosing folder keeps its own value.
        return first.clone() if isinstance(first, torch.Tensor) else first

    def _stand_in(self, node: torch.fx.Node, sizes: dict) -> torch.Tensor:
        """Zeros with the shape, dtype and device of a runtime tensor read only for its metadata."""
        traced = example_value(node)
        if not isinstance(traced, torch.Tensor):
            raise CannotEvaluate(f"no shape recorded for `{node.name}`")
        shape = [concrete(size, sizes) for size in traced.shape]
        return torch.zeros(shape, dtype=traced.dtype, device=traced.device)


def _sizes_in(value: Any) -> list:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return [value]
    if isinstance(value, torch.Tensor):
        return [size for size in value.shape if isinstance(size, torch.SymInt)]
    return []


def _shape_symbols(node: torch.fx.Node) -> set:
    symbols: set = set()
    for size in _sizes_in(example_value(node)):
        symbols |= size.node.expr.free_symbols
    return symbols


def concrete(size: Any, sizes: dict) -> Any:
    """An int (or bool/float) for a possibly symbolic size, with symbols valued from `sizes`."""
    if not isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return size
    expr = size.node.expr.xreplace({symbol: sizes[symbol] for symbol in size.node.expr.free_symbols
                                    if symbol in sizes})
    if getattr(expr, "free_symbols", None):
        raise CannotEvaluate(f"size {size} has no value for {sorted(map(str, expr.free_symbols))}")
    if isinstance(size, torch.SymBool):
        return bool(expr)
    if isinstance(size, torch.SymFloat):
        return float(expr)
    return int(expr)

