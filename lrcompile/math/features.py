"""Symmetric monomial feature maps: P(q . k) = phi(q) . psi(k) with r = C(d+g, g) features.

This module owns the vector half of the polynomial method. For P(x) = sum_m c_m x^m,

    (q . k)^m = sum_{|alpha| = m} (m choose alpha) q^alpha k^alpha

so with mono(x) = [x^alpha for every multi-index alpha with |alpha| <= g],
    psi(k) = mono(k)                         (no coefficient: keys stay sign-free)
    phi(q) = coefficients * mono(q)          (c_m times the multinomial, sign included)
gives phi(q) . psi(k) = P(q . k) exactly.

Degree-m monomials are built from degree-(m-1) ones: every multi-index i_1 <= ... <= i_m is
its parent (i_1..i_{m-1}) times x[i_m]. The monomials of each degree are ordered by their
largest index, so those of degree m whose largest index is j are exactly a prefix of degree m-1
(the N_{m-1}(j) = C(j+m-1, m-1) monomials with largest index <= j) times x[j]. Evaluations of that one
structure:

- `FeatureMap`, what the torch sweep (`lrcompile.kernels.reference`) calls: the torch evaluation
  below, written into the caller's buffer. The C kernels (`lrcompile.kernels.cpu.CFeatureMap`)
  fill in the same interface, one pass over memory per map (each feature the product of its
  parent and one x, tile by tile);
- eager torch: d slice products per degree, written straight into one buffer; the vector-Jacobian
  product is one in-place multiply-add and one reduction per slice;
- traced (torch.compile): one gather from the outer product (mono_{m-1} x x) per degree, and the
  matching gather back, which Inductor fuses into single kernels instead of unrolling d slices.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import is_fake


def feature_dim(head_dim: int, degree: int) -> int:
    """r = C(d + g, g): the number of monomials of degree <= g in d variables."""
    return math.comb(head_dim + degree, degree)


@dataclass(frozen=True)
class MonomialTable:
    """Index tables for the monomials of degree <= `degree` in `head_dim` variables.

    For each degree m >= 1, `gather[m-1]` picks the degree-m monomials out of the flattened
    outer product (degree-(m-1) monomials) x (variables), and `scatter_back[m-1]` maps every
    entry of that outer product to its monomial, or to one past the end where it has none.
    `multinomial` holds (m choose alpha) for every monomial, in feature order.

    Tables are plain tuples; `index(...)` turns them into tensors. Under tracing (torch.compile)
    a fresh tensor is made on every call, so it is recorded as a constant of the traced graph; in
    eager mode the tensors are cached per device.
    """

    head_dim: int
    degree: int
    sizes: tuple[int, ...]  # number of monomials of degree exactly m, m = 0..degree
    gather: tuple[tuple[int, ...], ...]
    scatter_back: tuple[tuple[int, ...], ...]
    multinomial: tuple[float, ...]
    degree_of_feature: tuple[int, ...]
    prefix: tuple[tuple[int, ...], ...]  # prefix[m-1][j] = N_{m-1}(j): degree m-1 monomials with largest index <= j
    # feature t >= 1 is feature parent[t] times x[last[t]] (the recursion the C kernels run)
    parent: tuple[int, ...]
    last: tuple[int, ...]
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def feature_dim(self) -> int:
        return sum(self.sizes)

    @property
    def lower_dim(self) -> int:
        """Number of monomials of degree < g: the parents of the top degree."""
        return self.feature_dim - self.sizes[-1]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Row where the monomials of each degree start, and the end: (0, 1, 1 + d, ...)."""
        return tuple(sum(self.sizes[:m]) for m in range(self.degree + 2))

    def index(self, name: str, m: int, like: torch.Tensor) -> torch.Tensor:
        """The int64 tensor of table `name` ("gather" or "scatter_back") for degree m."""
        values = getattr(self, name)[m - 1]
        if is_tracing(like):
            return torch.tensor(values, dtype=torch.int64, device=like.device)
        key = (name, m, like.device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(values, dtype=torch.int64, device=like.device)
        return self._cache[key]

    def recursion(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(parent, last) as int32 CPU tensors, made once per table: what the C kernels index."""
        if "recursion" not in self._cache:
            self._cache["recursion"] = (torch.tensor(self.parent, dtype=torch.int32),
                                        torch.tensor(self.last, dtype=torch.int32))
        return self._cache["recursion"]

    def coefficients(self, polynomial_coefficients, dtype, device) -> torch.Tensor:
        """c_{|alpha|} (|alpha| choose alpha) per feature: the query-side weights of phi."""
        values = [polynomial_coefficients[m] * w for m, w in zip(self.degree_of_feature, self.multinomial)]
        return torch.tensor(values, dtype=dtype, device=device)


def is_tracing(t: torch.Tensor) -> bool:
    """True under torch.compile or fake-tensor tracing, where data cannot be read."""
    return torch.compiler.is_compiling() or is_fake(t)


def monomial_table(head_dim: int, degree: int) -> MonomialTable:
    """The (cached) tables for d = head_dim, g = degree."""
    return _monomial_table(int(head_dim), int(degree))


@functools.lru_cache(maxsize=None)
def _monomial_table(head_dim: int, degree: int) -> MonomialTable:
    if head_dim < 1 or degree < 0:
        raise ValueError(f"need head_dim >= 1 and degree >= 0, got head_dim={head_dim}, degree={degree}")
    # max_index[m][t]: largest variable index of degree-m monomial t; multinomial[m][t] likewise.
    max_index = [[-1]]
    counts = [[()]]  # exponent multiset per monomial, as a sorted tuple of variable indices
    gather, scatter_back = [], []
    parent_of, last_of = [0], [0]
    for m in range(1, degree + 1):
        parents = max_index[-1]
        parent_offset = len(parent_of) - len(parents)
        flat, new_max, new_counts = [], [], []
        for last in range(head_dim):
            for p, parent_max in enumerate(parents):
                if parent_max <= last:
                    flat.append(p * head_dim + last)
                    new_max.append(last)
                    new_counts.append(counts[-1][p] + (last,))
                    parent_of.append(parent_offset + p)
                    last_of.append(last)
        back = [len(flat)] * (len(parents) * head_dim)
        for position, entry in enumerate(flat):
            back[entry] = position
        gather.append(tuple(flat))
        scatter_back.append(tuple(back))
        max_index.append(new_max)
        counts.append(new_counts)

    multinomial, degree_of_feature = [], []
    for m, monomials in enumerate(counts):
        for indices in monomials:
            ways = math.factorial(m)
            for i in set(indices):
                ways //= math.factorial(indices.count(i))
            multinomial.append(float(ways))
            degree_of_feature.append(m)
    return MonomialTable(
        head_dim=head_dim,
        degree=degree,
        sizes=tuple(len(c) for c in counts),
        gather=tuple(gather),
        scatter_back=tuple(scatter_back),
        multinomial=tuple(multinomial),
        degree_of_feature=tuple(degree_of_feature),
        prefix=tuple(tuple(math.comb(j + m - 1, m - 1) for j in range(head_dim)) for m in range(1, degree + 1)),
        parent=tuple(parent_of),
        last=tuple(last_of),
    )


def monomials(x: torch.Tensor, table: MonomialTable) -> torch.Tensor:
    """All monomials of degree <= g of the last axis of x: (..., d) -> (..., r)."""
    return monomials_t(x.mT, table).mT


def monomials_backward(x: torch.Tensor, grad: torch.Tensor, table: MonomialTable) -> torch.Tensor:
    """Vector-Jacobian product of `monomials`: dL/dmono (..., r) -> dL/dx (..., d)."""
    return monomials_backward_t(x.mT, grad.mT, table).mT


# The kernels work feature-major, (..., r, C) for a chunk of C rows: each gather then copies
# whole contiguous rows of length C, and the matrix products take the transposed operand for free.


def monomials_t(x_t: torch.Tensor, table: MonomialTable) -> torch.Tensor:
    """Feature-major monomials: (..., d, C) -> (..., r, C)."""
    if is_tracing(x_t) or (x_t.requires_grad and torch.is_grad_enabled()):  # out= writes are not differentiable
        return torch.cat(_gathered_monomials_t(x_t, table), dim=-2)
    offsets = table.offsets
    out = x_t.new_empty(x_t.shape[:-2] + (table.feature_dim, x_t.shape[-1]))
    out[..., 0, :] = 1
    out[..., 1:offsets[2], :] = x_t
    for m in range(2, table.degree + 1):
        parents, row = out[..., offsets[m - 1]:offsets[m], :], offsets[m]
        for j, count in enumerate(table.prefix[m - 1]):
            torch.mul(parents[..., :count, :], x_t[..., j:j + 1, :], out=out[..., row:row + count, :])
            row += count
    return out


def monomials_backward_t(
    x_t: torch.Tensor, grad_t: torch.Tensor, table: MonomialTable, features_t: torch.Tensor | None = None
) -> torch.Tensor:
    """Feature-major vector-Jacobian product: dL/dmono (..., r, C) -> dL/dx (..., d, C).

    Degree by degree from the top: block j of degree m is F_{m-1}[:N(j)] * x[j], so with G its
    gradient,  dL/dx[j] += sum over the block of G * F_{m-1}[:N(j)]  and
    dL/dF_{m-1}[:N(j)] += G * x[j].  Degree 1 is x itself.
    `features_t` may pass in monomials_t(x_t) when the caller already has it.
    """
    if is_tracing(x_t) or (torch.is_grad_enabled() and (x_t.requires_grad or grad_t.requires_grad)):
        return _gathered_monomials_backward_t(x_t, grad_t, table)
    if features_t is None:
        features_t = monomials_t(x_t, table)
    offsets = table.offsets
    # Degrees below the top accumulate what flows down from above: only they need a copy.
    lower = grad_t[..., :offsets[table.degree], :].clone()
    dx = torch.zeros_like(x_t)
    for m in range(table.degree, 1, -1):
        parents = features_t[..., offsets[m - 1]:offsets[m], :]
        d_parents = lower[..., offsets[m - 1]:offsets[m], :]
        grad_m = grad_t if m == table.degree else lower
        row = offsets[m]
        for j, count in enumerate(table.prefix[m - 1]):
            block = grad_m[..., row:row + count, :]
            dx[..., j, :] += (block * parents[..., :count, :]).sum(-2)
            d_parents[..., :count, :].addcmul_(block, x_t[..., j:j + 1, :])
            row += count
    degree_one = lower if table.degree > 1 else grad_t  # degree-1 monomials are x itself
    return dx + degree_one[..., offsets[1]:offsets[2], :]


def _gathered_monomials_t(x_t: torch.Tensor, table: MonomialTable) -> list[torch.Tensor]:
    by_degree = [x_t.new_ones(x_t.shape[:-2] + (1, x_t.shape[-1]))]
    for m in range(1, table.degree + 1):
        outer = by_degree[-1].unsqueeze(-2) * x_t.unsqueeze(-3)  # (..., r_{m-1}, d, C)
        by_degree.append(outer.flatten(-3, -2).index_select(-2, table.index("gather", m, x_t)))
    return by_degree


def _gathered_monomials_backward_t(x_t: torch.Tensor, grad_t: torch.Tensor, table: MonomialTable) -> torch.Tensor:
    """The same VJP as gathers: the outer product's gradient is G_m gathered back (zero where no
    monomial sits); dL/dx += sum over parents of F_{m-1} * G_outer, dL/dF_{m-1} += sum over
    variables of G_outer * x."""
    by_degree = _gathered_monomials_t(x_t, table)
    grads = list(grad_t.split(table.sizes, dim=-2))
    dx = torch.zeros_like(x_t)
    for m in range(table.degree, 0, -1):
        padded = torch.cat([grads[m], grads[m].new_zeros(grads[m].shape[:-2] + (1, grads[m].shape[-1]))], dim=-2)
        outer_grad = padded.index_select(-2, table.index("scatter_back", m, x_t))
        outer_grad = outer_grad.unflatten(-2, (table.sizes[m - 1], table.head_dim))  # (..., r_{m-1}, d, C)
        dx = dx + (by_degree[m - 1].unsqueeze(-2) * outer_grad).sum(-3)
        if m > 1:
            grads[m - 1] = grads[m - 1] + (outer_grad * x_t.unsqueeze(-3)).sum(-2)
    return dx


class FeatureMap:
    """phi (with `coefficients`) or psi (without) for rows of one dtype and device, into buffers.

    Rows are (B, C, d) with unit last stride; features are feature-major (B, r, C), as the
    attention's matrix products take them. The torch evaluation; `lrcompile.kernels.cpu.CFeatureMap`
    computes the same values in C.
    """

    def __init__(self, table: MonomialTable, coefficients: torch.Tensor | None, like: torch.Tensor):
        self.table = table
        self.coefficients = coefficients  # (r,) or None

    def __call__(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, r, C) <- phi(rows) or psi(rows)."""
        features = monomials_t(rows.mT, self.table)
        if self.coefficients is not None:
            features = features * self.coefficients[:, None]
        return out.copy_(features)

    def backward(self, rows: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, C, d) <- dL/drows, given grad = dL/dfeatures (B, r, C)."""
        if self.coefficients is not None:
            grad = grad * self.coefficients[:, None]
        return out.copy_(monomials_backward_t(rows.mT, grad, self.table).mT)
