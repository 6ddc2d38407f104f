"""A corpus of small attention modules, one per spelling the passes must handle (docs/design.md §4).

Each module writes its attention the way real code does; `CASES` pairs it with example inputs and
what `find_attention_sites` must report. The tests in `test_passes_*.py` run every case through
Dynamo and check the report and the replacement. Shapes: batch 2, sequence 8 (memory 6 for
cross-attention), model dim 16, 2 heads of dim 8 (4 query heads over 2 key/value heads for GQA).

Also the shared fixtures of those tests: capturing Dynamo graphs, and backends that replace sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from passes import find_attention_sites, replace_attention_site

BATCH, SEQ, MEMORY, DIM, HEADS, HEAD_DIM = 2, 8, 6, 16, 2, 8


# ---------------------------------------------------------------------------------------------
# Modules. `Heads` does the projections; each subclass's `attend` is the spelling under test.


class Heads(nn.Module):
    """x (B, n, C) -> q, k, v (B, H, n, d) -> attend -> (B, n, C)."""

    def __init__(self, heads: int = HEADS, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.q_proj = nn.Linear(DIM, heads * HEAD_DIM)
        self.kv_proj = nn.Linear(DIM, 2 * self.kv_heads * HEAD_DIM)
        self.out_proj = nn.Linear(heads * HEAD_DIM, DIM)

    def split(self, x, memory=None):
        memory = x if memory is None else memory
        q = self.q_proj(x).view(x.shape[0], x.shape[1], self.heads, HEAD_DIM).transpose(1, 2)
        k, v = self.kv_proj(memory).view(memory.shape[0], memory.shape[1], 2 * self.kv_heads, HEAD_DIM
                                          ).transpose(1, 2).chunk(2, dim=1)
        return q, k, v

    def forward(self, x, *extra):
        q, k, v = self.split(x)
        out = self.attend(q, k, v, *extra)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class SdpaNoMask(Heads):
    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class SdpaBoolKeyPadding(Heads):
    def attend(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


class SdpaFloatKeyPadding(Heads):
    def attend(self, q, k, v, keep):
        bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])


class SdpaIsCausal(Heads):
    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SdpaScale(Heads):
    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.2)


class SdpaEnableGqa(Heads):
    def __init__(self):
        super().__init__(heads=4, kv_heads=2)

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class SdpaDropout(Heads):
    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)


class SdpaPositional(Heads):
    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)


class SdpaCausalAndKeyPadding(Heads):
    def attend(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], is_causal=True)


class NanoGptCausal(nn.Module):
    """nanoGPT's CausalSelfAttention, slow path."""

    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(DIM, 3 * DIM)
        self.c_proj = nn.Linear(DIM, DIM)
        self.attn_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(DIM, dim=2)
        k = k.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        q = q.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        v = v.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MatmulPermuteDivide(Heads):
    def attend(self, q, k, v):
        scores = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(HEAD_DIM)
        return torch.matmul(scores.softmax(dim=-1), v)


class BmmMatrixTransposeSoftmaxModule(Heads):
    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def attend(self, q, k, v):
        B, H, n, d = q.shape
        q, k, v = q.reshape(B * H, n, d), k.reshape(B * H, n, d), v.reshape(B * H, n, d)
        weights = self.softmax(torch.bmm(q, k.mT) * d ** -0.5)
        return torch.bmm(weights, v).view(B, H, n, d)


class EinsumHeadsFirst(Heads):
    def attend(self, q, k, v):
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * HEAD_DIM ** -0.5
        return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


class EinsumHeadsLast(nn.Module):
    """Heads kept in the (B, n, H, d) layout of the projection; the einsums move them."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, HEADS, HEAD_DIM).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
        out = torch.einsum("bhqk,bkhd->bqhd", F.softmax(scores, dim=-1), v)
        return out.reshape(B, n, DIM)


class EllipsisEinsum(Heads):
    def attend(self, q, k, v):
        scores = torch.einsum("...qd,...kd->...qk", q, k) * HEAD_DIM ** -0.5
        return torch.einsum("...qk,...kd->...qd", scores.softmax(-1), v)


class ScaleByTensorBuffer(Heads):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(HEAD_DIM ** -0.5))

    def attend(self, q, k, v):
        return (q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v


class ScaleOnQueries(Heads):
    def attend(self, q, k, v):
        q = q * HEAD_DIM ** -0.5
        return torch.softmax(q @ k.transpose(2, 3), dim=-1) @ v


class LearnedTemperature(Heads):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def attend(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) / self.temperature, dim=-1) @ v


class SoftmaxDtypeUpcast(Heads):
    """Llama-style: softmax computed in a wider dtype, cast back to q's."""

    def attend(self, q, k, v):
        weights = F.softmax(q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5, dim=-1, dtype=torch.float64)
        return weights.to(q.dtype) @ v


class SoftmaxMethodCasts(Heads):
    def attend(self, q, k, v):
        scores = (q @ k.transpose(-2, -1)).double() * HEAD_DIM ** -0.5
        return scores.softmax(dim=-1).type_as(q) @ v


class WhereCausalFromPositions(Heads):
    """A causal mask from position comparisons, as transformers' masking utilities build it."""

    def attend(self, q, k, v):
        n = q.shape[-2]
        positions = torch.arange(n, device=q.device)
        causal = positions[None, :] <= positions[:, None]
        scores = torch.where(causal, q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5, float("-inf"))
        return scores.softmax(-1) @ v


class AdditiveCausalBuffer(Heads):
    def __init__(self):
        super().__init__()
        self.register_buffer("causal", torch.full((16, 16), float("-inf")).triu(1))

    def attend(self, q, k, v):
        n = q.shape[-2]
        scores = q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5 + self.causal[:n, :n]
        return scores.softmax(-1) @ v


class MaskedFillKeyPadding(Heads):
    def attend(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1)) * HEAD_DIM ** -0.5
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return scores.softmax(-1) @ v


class AdditiveKeyPaddingBertStyle(Heads):
    def attend(self, q, k, v, keep):
        extended = (1.0 - keep[:, None, None, :].to(q.dtype)) * -10000.0
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + extended
        return nn.functional.softmax(scores, dim=-1) @ v


class CausalAndKeyPadding(Heads):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(16, 16, dtype=torch.bool)))

    def attend(self, q, k, v, keep):
        n = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * HEAD_DIM ** -0.5
        scores = scores.masked_fill(~self.bias[:n, :n], float("-inf"))
        scores = scores + torch.zeros_like(keep, dtype=q.dtype).masked_fill(~keep, -1e9)[:, None, None, :]
        return scores.softmax(-1) @ v


class GqaRepeatInterleave(Heads):
    def __init__(self):
        super().__init__(heads=4, kv_heads=2)

    def attend(self, q, k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=-3)
        return F.softmax(q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5, dim=-1) @ v


def repeat_kv(hidden_states, n_rep):
    """transformers' repeat_kv."""
    batch, kv_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, slen, head_dim)


class GqaExpandReshape(Heads):
    def __init__(self):
        super().__init__(heads=4, kv_heads=2)

    def attend(self, q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        return F.softmax(q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5, dim=-1) @ v


class MultiQueryBroadcast(Heads):
    """One key/value head broadcast by matmul over 2 query heads."""

    def __init__(self):
        super().__init__(heads=2, kv_heads=1)

    def attend(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5, dim=-1) @ v


class CrossAttentionKeyPadding(Heads):
    def forward(self, x, memory, keep):
        q, k, v = self.split(x, memory)
        scores = q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5
        scores = scores.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
        out = scores.softmax(-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class ReshapePermuteHeads(nn.Module):
    """Heads split with reshape/permute, merged with permute/contiguous/view."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        B, n, _ = x.shape
        q, k, v = (projection(x).reshape(B, n, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
                   for projection in (self.q, self.k, self.v))
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2).contiguous()) * 0.25, -1)
        return torch.matmul(weights, v).permute(0, 2, 1, 3).contiguous().view(B, n, DIM)


class TwoLayers(nn.Module):
    """Two attention layers: the second's queries are computed from the first's output."""

    def __init__(self):
        super().__init__()
        self.first, self.second = NanoGptCausal(), MaskedFillKeyPadding()

    def forward(self, x, keep):
        return self.second(self.first(x) + x, keep)


# -- negative cases -----------------------------------------------------------------------------


class AlibiBias(Heads):
    """Bidirectional ALiBi: -slope * |i - j| (not a per-key bias plus a per-query constant)."""

    def __init__(self):
        super().__init__()
        positions = torch.arange(SEQ)
        distance = -(positions[None, :] - positions[:, None]).abs().float()
        slopes = torch.tensor([0.5, 0.25])
        self.register_buffer("alibi", slopes[:, None, None] * distance)

    def attend(self, q, k, v):
        return (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5 + self.alibi.to(q.dtype)).softmax(-1) @ v


class RelativePositionBias(Heads):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(2 * SEQ - 1, HEADS)

    def attend(self, q, k, v):
        n = q.shape[-2]
        positions = torch.arange(n)
        bias = self.table(positions[None, :] - positions[:, None] + SEQ - 1).permute(2, 0, 1)
        return (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5 + bias.to(q.dtype)).softmax(-1) @ v


class SlidingWindow(Heads):
    def attend(self, q, k, v):
        n = q.shape[-2]
        positions = torch.arange(n)
        distance = positions[:, None] - positions[None, :]
        window = (distance >= 0) & (distance < 3)
        scores = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).masked_fill(~window, float("-inf"))
        return scores.softmax(-1) @ v


class BottomRightCausal(Heads):
    """Queries are the last 4 positions of 8 keys (a cache), causal aligned bottom-right."""

    def forward(self, x):
        q, k, v = self.split(x)
        q = q[:, :, -4:]
        causal = torch.ones(4, SEQ, dtype=torch.bool).tril(SEQ - 4)
        scores = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).masked_fill(~causal, float("-inf"))
        return scores.softmax(-1) @ v


class ReturnedWeights(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        weights = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(-1)
        return weights @ v, weights


class ReturnedScores(Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5
        return scores.softmax(-1) @ v, scores


class WeightsAlsoSummed(Heads):
    def attend(self, q, k, v):
        weights = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(-1)
        return weights @ v + weights.sum()


class DropoutOnWeights(Heads):
    def attend(self, q, k, v):
        weights = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(-1)
        return F.dropout(weights, p=0.1, training=self.training) @ v


class SoftmaxOverQueryAxis(Heads):
    def attend(self, q, k, v):
        return (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(dim=-2) @ v


class SoftmaxNotTimesValues(Heads):
    """Attention-like weights used as a gate, never multiplied by V."""

    def attend(self, q, k, v):
        weights = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(-1)
        return v * weights.amax(-1, keepdim=True)


class TanhSoftCap(Heads):
    def attend(self, q, k, v):
        scores = torch.tanh(q @ k.transpose(-2, -1) / 50.0) * 50.0
        return scores.softmax(-1) @ v


class EinsumTwoContractedLetters(Heads):
    """Scores summed over two letters (head dim split in two): not one Q Kᵀ the layout can name."""

    def attend(self, q, k, v):
        q, k = q.unflatten(-1, (2, 4)), k.unflatten(-1, (2, 4))
        return torch.einsum("bhqxy,bhkxy->bhqk", q, k).softmax(-1) @ v


class InPlaceMaskedFill(Heads):
    def attend(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5
        scores.masked_fill_(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v


class RouterSoftmax(nn.Module):
    """A mixture-of-experts router: a softmax, but not attention."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(DIM, 4)
        self.experts = nn.Parameter(torch.randn(4, DIM))

    def forward(self, x):
        return F.softmax(self.gate(x), dim=-1) @ self.experts


# ---------------------------------------------------------------------------------------------
# Inputs


def _x(dtype):
    return torch.randn(BATCH, SEQ, DIM, dtype=dtype)


def _keep(length=SEQ):
    keep = torch.ones(BATCH, length, dtype=torch.bool)
    keep[1, -3:] = False  # right padding: every query row keeps at least one key
    return keep


def x_only(dtype):
    return (_x(dtype),)


def x_and_keep(dtype):
    return (_x(dtype), _keep())


def x_memory_keep(dtype):
    return (_x(dtype), torch.randn(BATCH, MEMORY, DIM, dtype=dtype), _keep(MEMORY))


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Expected:
    masks: tuple[str, ...]          # mask kind of each site, in graph order (len = number of sites)
    supported: tuple[bool, ...]     # per site
    reason: str = ""                # substring of every kept site's reason
    gqa: bool = False               # k/v passed un-repeated (or broadcast) with enable_gqa=True


@dataclass(frozen=True)
class Case:
    name: str
    module: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], tuple]
    expected: Expected
    training: bool = False
    dtype: torch.dtype = torch.float64

    def build(self) -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        module = self.module().to(self.dtype).train(self.training)
        return module, self.inputs(self.dtype)


def _ok(*masks, gqa=False):
    return Expected(tuple(masks), (True,) * len(masks), gqa=gqa)


def _kept(mask, reason):
    return Expected((mask,), (False,), reason)


CASES = [
    Case("sdpa_no_mask", SdpaNoMask, x_only, _ok("none")),
    Case("sdpa_bool_key_padding", SdpaBoolKeyPadding, x_and_keep, _ok("key_padding")),
    Case("sdpa_float_key_padding", SdpaFloatKeyPadding, x_and_keep, _ok("key_padding")),
    Case("sdpa_is_causal", SdpaIsCausal, x_only, _ok("causal")),
    Case("sdpa_scale", SdpaScale, x_only, _ok("none")),
    Case("sdpa_enable_gqa", SdpaEnableGqa, x_only, _ok("none", gqa=True)),
    Case("sdpa_dropout_in_eval", SdpaDropout, x_only, _ok("none")),
    Case("sdpa_positional_arguments", SdpaPositional, x_only, _ok("causal")),
    Case("sdpa_causal_and_key_padding", SdpaCausalAndKeyPadding, x_and_keep, _ok("causal+key_padding")),
    Case("nanogpt_causal_buffer", NanoGptCausal, x_only, _ok("causal")),
    Case("matmul_permute_divide", MatmulPermuteDivide, x_only, _ok("none")),
    Case("bmm_mT_softmax_module", BmmMatrixTransposeSoftmaxModule, x_only, _ok("none")),
    Case("einsum_heads_first", EinsumHeadsFirst, x_only, _ok("none")),
    Case("einsum_heads_last", EinsumHeadsLast, x_only, _ok("none")),
    Case("einsum_ellipsis", EllipsisEinsum, x_only, _ok("none")),
    Case("scale_by_tensor_buffer", ScaleByTensorBuffer, x_only, _ok("none")),
    Case("scale_on_queries", ScaleOnQueries, x_only, _ok("none")),
    Case("learned_temperature", LearnedTemperature, x_only, _ok("none")),
    Case("softmax_dtype_upcast", SoftmaxDtypeUpcast, x_only, _ok("none"), dtype=torch.float32),
    Case("softmax_method_casts", SoftmaxMethodCasts, x_only, _ok("none"), dtype=torch.float32),
    Case("where_causal_from_positions", WhereCausalFromPositions, x_only, _ok("causal")),
    Case("additive_causal_buffer", AdditiveCausalBuffer, x_only, _ok("causal")),
    Case("masked_fill_key_padding", MaskedFillKeyPadding, x_and_keep, _ok("key_padding")),
    Case("additive_key_padding_bert_style", AdditiveKeyPaddingBertStyle, x_and_keep, _ok("key_padding")),
    Case("causal_and_key_padding", CausalAndKeyPadding, x_and_keep, _ok("causal+key_padding")),
    Case("gqa_repeat_interleave", GqaRepeatInterleave, x_only, _ok("none", gqa=True)),
    Case("gqa_expand_reshape", GqaExpandReshape, x_only, _ok("none", gqa=True)),
    Case("multi_query_broadcast", MultiQueryBroadcast, x_only, _ok("none", gqa=True)),
    Case("cross_attention_key_padding", CrossAttentionKeyPadding, x_memory_keep, _ok("key_padding")),
    Case("reshape_permute_heads", ReshapePermuteHeads, x_only, _ok("none")),
    Case("two_layers", TwoLayers, x_and_keep, _ok("causal", "key_padding")),
    # Kept exact, with the reason a user sees.
    Case("alibi_bias", AlibiBias, x_only, _kept("general", "varies along the query axis")),
    Case("relative_position_bias", RelativePositionBias, x_only, _kept("general", "relative position")),
    Case("sliding_window", SlidingWindow, x_only, _kept("general", "sliding window")),
    Case("bottom_right_causal", BottomRightCausal, x_only, _kept("general", "bottom-right")),
    Case("returned_weights", ReturnedWeights, x_only, _kept("none", "attention weights are returned")),
    Case("returned_scores", ReturnedScores, x_only, _kept("none", "the scores are returned")),
    Case("weights_also_summed", WeightsAlsoSummed, x_only, _kept("none", "attention weights")),
    Case("dropout_on_weights_training", DropoutOnWeights, x_only, _kept("none", "training mode"),
         training=True),
    Case("sdpa_dropout_training", SdpaDropout, x_only, _kept("none", "dropout_p=0.1"), training=True),
    Case("softmax_over_query_axis", SoftmaxOverQueryAxis, x_only, _kept("none", "query axis")),
    Case("softmax_not_times_values", SoftmaxNotTimesValues, x_only, _kept("none", "not multiplied by V")),
    Case("tanh_soft_cap", TanhSoftCap, x_only, _kept("none", "tanh")),
    Case("einsum_two_contracted_letters", EinsumTwoContractedLetters, x_only, _kept("none", "contracts")),
    Case("in_place_masked_fill", InPlaceMaskedFill, x_only, _kept("none", "masked_fill_")),
    Case("router_softmax_is_not_attention", RouterSoftmax, x_only, Expected((), ())),
]
CASES_BY_NAME = {case.name: case for case in CASES}


# ---------------------------------------------------------------------------------------------
# Fixtures shared by the tests


@dataclass
class Captured:
    """One graph Dynamo handed a backend, with the sites found in it *inside* the backend call
    (Dynamo drops the buffers' compile-time values from node.meta once the backend returns)."""

    gm: torch.fx.GraphModule
    example_inputs: list
    sites: list


def capture_graphs(module: nn.Module, inputs: tuple, dynamic: bool | None = False) -> list[Captured]:
    """The graphs Dynamo produces for module(*inputs), each with its attention sites."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(Captured(gm, list(example_inputs), find_attention_sites(gm)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=backend, dynamic=dynamic)(*inputs)
    return graphs


def capture_one_graph(module: nn.Module, inputs: tuple, dynamic: bool | None = False) -> Captured:
    graphs = capture_graphs(module, inputs, dynamic)
    assert len(graphs) == 1, f"expected one graph (no graph break), Dynamo produced {len(graphs)}"
    return graphs[0]


def replace_supported_sites(gm: torch.fx.GraphModule, attention_fn=F.scaled_dot_product_attention) -> int:
    """Replace every supported site found before the first replacement; the number replaced."""
    sites = [site for site in find_attention_sites(gm) if site.supported]
    for site in sites:
        replace_attention_site(gm, site, attention_fn)
    return len(sites)


def replacing_backend(compile_with=None, attention_fn=F.scaled_dot_product_attention, replaced=None):
    """A torch.compile backend replacing supported sites, then running FX or `compile_with(gm, inputs)`."""

    def backend(gm, example_inputs):
        count = replace_supported_sites(gm, attention_fn)
        if replaced is not None:
            replaced.append(count)
        return gm.forward if compile_with is None else compile_with(gm, example_inputs)

    return backend
