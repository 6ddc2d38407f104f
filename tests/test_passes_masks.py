"""Mask classification: proven by computing the constant part, never assumed from how it is written."""

import pytest
import torch
import torch.nn.functional as F

from attention_corpus import (
    BATCH, DIM, HEAD_DIM, SEQ, Heads, NanoGptCausal, capture_graphs, capture_one_graph, replacing_backend,
)


def only_site(module, *inputs, dynamic=False):
    (site,) = capture_one_graph(module.double().eval(), inputs, dynamic).sites
    return site


def x(length=SEQ):
    return torch.randn(BATCH, length, DIM, dtype=torch.float64)


class BufferMasked(Heads):
    """masked_fill with a slice of a registered buffer, whatever its contents."""

    def __init__(self, buffer):
        super().__init__()
        self.register_buffer("allowed", buffer)

    def attend(self, q, k, v):
        n = q.shape[-2]
        scores = q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5
        scores = scores.masked_fill(self.allowed[:n, :n] == 0, float("-inf"))
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("buffer, kind", [
    (torch.ones(16, 16).tril(), "causal"),
    (torch.ones(16, 16), "none"),
    (torch.ones(16, 16).tril(1), "general"),    # one diagonal too many: not causal
    (torch.ones(16, 16).tril(-1), "general"),   # first query sees nothing
    (torch.ones(16, 16).triu(), "general"),     # anti-causal
])
def test_buffer_mask_is_classified_by_its_contents_not_its_spelling(buffer, kind):
    assert only_site(BufferMasked(buffer), x()).mask == kind


def test_mutating_the_causal_buffer_before_compiling_changes_the_classification():
    module = NanoGptCausal()
    module.bias[..., 3, 0] = 0.0

    assert only_site(module, x()).mask == "general"


class RuntimeMask(Heads):
    def attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_runtime_mask_with_a_query_axis_is_general_even_when_its_values_are_causal():
    causal_values = torch.ones(BATCH, 1, SEQ, SEQ, dtype=torch.bool).tril()

    site = only_site(RuntimeMask(), x(), causal_values)

    assert site.mask == "general" and "varies along the query axis" in site.reason


def test_runtime_mask_broadcast_over_queries_is_key_padding():
    keep = torch.ones(BATCH, 1, 1, SEQ, dtype=torch.bool)

    assert only_site(RuntimeMask(), x(), keep).mask == "key_padding"


class FillValue(Heads):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def attend(self, q, k, v):
        causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
        return (q @ k.transpose(-2, -1)).masked_fill(~causal, self.value).softmax(-1) @ v


@pytest.mark.parametrize("value, supported",
                         [(float("-inf"), True), (-1e9, True), (-1e4, True), (-100.0, False)])
def test_masked_fill_counts_as_a_mask_only_with_a_very_negative_value(value, supported):
    site = only_site(FillValue(value), x())

    assert site.supported == supported
    if not supported:
        assert "not to a very negative value" in site.reason


class PerKeyBias(Heads):
    """A constant additive bias that varies per key only: exact as a float key-padding mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.linspace(-2.0, 2.0, SEQ)[None, None, None, :])

    def attend(self, q, k, v):
        return (q @ k.transpose(-2, -1) + self.bias).softmax(-1) @ v


def test_constant_per_key_bias_is_a_key_bias_and_replaced_exactly():
    module, inputs = PerKeyBias().double().eval(), (x(),)

    site = only_site(module, *inputs)
    with torch.no_grad():
        replaced = torch.compile(module, backend=replacing_backend())(*inputs)

    assert site.mask == "key_bias"
    torch.testing.assert_close(replaced, module(*inputs))


class WindowOfEight(Heads):
    """Sliding window of 8 positions: causal while n <= 8, a true window beyond."""

    def attend(self, q, k, v):
        positions = torch.arange(q.shape[-2])
        distance = positions[:, None] - positions[None, :]
        window = (distance >= 0) & (distance < 8)
        return (q @ k.transpose(-2, -1)).masked_fill(~window, float("-inf")).softmax(-1) @ v


def test_static_shapes_classify_the_mask_at_the_traced_length():
    assert only_site(WindowOfEight(), x(8)).mask == "causal"
    assert only_site(WindowOfEight(), x(12)).mask == "general"


def test_dynamic_shapes_recheck_the_mask_at_other_lengths():
    site = only_site(WindowOfEight(), x(8), dynamic=True)

    assert site.mask == "general" and "other sizes" in site.reason


@pytest.mark.parametrize("name",
                         ["nanogpt_causal_buffer", "where_causal_from_positions", "causal_and_key_padding"])
def test_dynamic_shapes_keep_causal_masks_causal(name):
    from attention_corpus import CASES_BY_NAME

    module, inputs = CASES_BY_NAME[name].build()
    graphs = capture_graphs(module, inputs, dynamic=True)

    assert [site.mask for graph in graphs for site in graph.sites] == list(CASES_BY_NAME[name].expected.masks)
    assert any(not isinstance(size, int) for size in graphs[0].sites[0].query_shape)


class OneDimensionalKeyMask(Heads):
    """`scores.masked_fill(~m, -inf)` with m of shape (n,): broadcast over batch, heads and queries."""

    def attend(self, q, k, v):
        keep = torch.arange(q.shape[-2]) % 3 != 1
        return (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_a_one_dimensional_key_mask_is_passed_on_with_a_query_axis():
    """SDPA (and so the replacement's signature) wants attn_mask of at least 2 dimensions."""
    module, inputs = OneDimensionalKeyMask().double().eval(), (x(),)
    site = only_site(module, *inputs)
    with torch.no_grad():
        replaced = torch.compile(module, backend=replacing_backend())(*inputs)
    assert site.mask == "key_padding"
    torch.testing.assert_close(replaced, module(*inputs))


def test_explain_reads_a_one_dimensional_runtime_key_mask():
    import lrcompile

    class Masked(torch.nn.Module):
        def forward(self, q, k, v, m):
            return (q @ k.transpose(-2, -1) / 4).masked_fill(~m, float("-inf")).softmax(-1) @ v

    q, k, v = (0.2 * torch.randn(1, 2, 96, 16) for _ in range(3))
    m = torch.arange(96) % 4 != 0
    report = lrcompile.explain(Masked(), q, k, v, m, policy=lrcompile.Policy(cost_model=False, degree=4))
    (site,) = report.sites
    assert site.mask == "key_padding" and site.rewritten and site.measured_error < 1e-3
