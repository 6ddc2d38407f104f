"""Read two-operand einsum equations as attention layouts.

An einsum site names its axes with letters; the replacement needs permutations that bring q, k, v
to SDPA's canonical layout (batch..., n, d) and the result back to the einsum's output layout.

    "bhqd,bhkd->bhqk"   scores: q, k already canonical
    "bqhd,bkhd->bhqk"   scores: q and k permuted by (0, 2, 1, 3)
    "bhqk,bkhd->bqhd"   output: v permuted by (0, 2, 1, 3); result (b, h, q, d) permuted by (0, 2, 1, 3)
    "...qd,...kd->...qk" ellipsis: expanded to one letter per batch axis

Equations outside this shape (diagonals, several contracted letters, a batch letter missing in
one operand) raise EinsumLayoutError with the equation in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

_SPARE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class EinsumLayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ScoresLayout:
    q_operand: int                        # which operand holds the queries (0 or 1)
    q_permute: tuple[int, ...] | None     # q operand -> (batch..., n_q, d); None: already there
    k_permute: tuple[int, ...] | None     # k operand -> (batch..., n_k, d)


@dataclass(frozen=True)
class OutputLayout:
    v_permute: tuple[int, ...] | None       # v operand -> (batch..., n_k, d_v)
    output_permute: tuple[int, ...] | None  # (batch..., n_q, d_v) -> the einsum's output layout


def _expand(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise EinsumLayoutError(f"einsum {equation!r} has {len(terms)} operands, expected {len(ranks)}")
    spare = [c for c in _SPARE_LETTERS if c not in equation]
    widest = max((rank - (len(term) - 3) for term, rank in zip(terms, ranks) if "..." in term), default=0)
    batch = "".join(spare[:widest])
    expanded = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            count = rank - (len(term) - 3)
            term = term.replace("...", batch[widest - count:])
        if len(term) != rank:
            raise EinsumLayoutError(f"einsum {equation!r}: term {term!r} does not match an operand of "
                                    f"rank {rank}")
        if len(set(term)) != len(term):
            raise EinsumLayoutError(f"einsum {equation!r} takes a diagonal ({term!r}); not an attention "
                                    "product")
        expanded.append(term)
    if arrow:
        output = rhs.replace("...", batch)
    else:
        letters = "".join(expanded)
        output = batch + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in batch))
    return expanded, output


def _permutation(term: str, order: str) -> tuple[int, ...] | None:
    permutation = tuple(term.index(letter) for letter in order)
    return None if permutation == tuple(range(len(term))) else permutation


def read_scores_einsum(equation: str, ranks: list[int]) -> ScoresLayout:
    """The layout of a Q Kᵀ einsum whose output is (batch..., n_q, n_k)."""
    (first, second), output = _expand(equation, ranks)
    if len(output) < 2:
        raise EinsumLayoutError(f"einsum {equation!r} does not produce a (…, n_q, n_k) score matrix")
    query, key, batch = output[-2], output[-1], output[:-2]
    q_operand = 0 if query in first else 1
    q_term, k_term = (first, second) if q_operand == 0 else (second, first)
    contracted = (set(q_term) & set(k_term)) - set(output)
    if len(contracted) != 1:
        raise EinsumLayoutError(f"einsum {equation!r} contracts {sorted(contracted)}; an attention score "
                                "contracts exactly one head-dimension letter")
    (head_dim,) = contracted
    if set(q_term) != set(batch) | {query, head_dim} or set(k_term) != set(batch) | {key, head_dim}:
        raise EinsumLayoutError(f"einsum {equation!r}: every batch letter of the output must appear in both "
                                "operands (no broadcast batch axes)")
    return ScoresLayout(q_operand, _permutation(q_term, batch + query + head_dim),
                        _permutation(k_term, batch + key + head_dim))


def read_output_einsum(equation: str, ranks: list[int], weights_operand: int) -> OutputLayout:
    """The layout of a weights·V einsum; the weights operand is laid out (batch..., n_q, n_k)."""
    terms, output = _expand(equation, ranks)
    weights, values = terms[weights_operand], terms[1 - weights_operand]
    query, key, batch = weights[-2], weights[-1], weights[:-2]
    extra = set(values) - set(weights)
    if len(extra) != 1 or set(values) != set(batch) | {key} | extra:
        raise EinsumLayoutError(f"einsum {equation!r}: V must hold the batch letters, the key letter "
                                f"{key!r} and one value-dimension letter")
    (value_dim,) = extra
    if len(output) != len(batch) + 2 or set(output) != set(batch) | {query, value_dim}:
        raise EinsumLayoutError(f"einsum {equation!r} does not sum the weights over the key axis only")
    return OutputLayout(_permutation(values, batch + key + value_dim),
                        _permutation(batch + query + value_dim, output))
