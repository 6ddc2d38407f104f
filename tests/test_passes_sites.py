"""find_attention_sites: which sites are found in every spelling, and why some are kept."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from attention_corpus import CASES, CASES_BY_NAME, HEAD_DIM, capture_one_graph
from passes import AttentionSite, find_attention_sites, replace_attention_site


def sites_of(name: str) -> list[AttentionSite]:
    module, inputs = CASES_BY_NAME[name].build()
    return capture_one_graph(module, inputs).sites


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_corpus_spelling_reports_its_sites_masks_and_reasons(case):
    module, inputs = case.build()
    sites = capture_one_graph(module, inputs).sites

    assert [site.mask for site in sites] == list(case.expected.masks)
    assert [site.supported for site in sites] == list(case.expected.supported)
    for site in sites:
        if site.supported:
            assert site.reason == "" and site.replacement is not None
        else:
            assert case.expected.reason in site.reason and site.replacement is None
        assert site.is_causal == ("causal" in site.mask)


@pytest.mark.parametrize("case", [case for case in CASES if case.expected.gqa], ids=lambda case: case.name)
def test_repeated_or_broadcast_key_value_heads_are_passed_with_enable_gqa(case):
    (site,) = sites_of(case.name)

    assert site.replacement.enable_gqa
    assert site.key_shape[-3] < site.query_shape[-3]
    assert site.value_shape[-3] == site.key_shape[-3]


def test_nanogpt_site_reports_path_spelling_scale_and_canonical_shapes():
    module, inputs = CASES_BY_NAME["two_layers"].build()
    first, second = capture_one_graph(module, inputs).sites

    assert (first.module_path, second.module_path) == ("first", "second")
    assert first.spelling == "matmul+softmax"
    assert first.scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
    assert first.query_shape == first.key_shape == first.value_shape == (2, 2, 8, 8)
    assert first.name != second.name
    assert first.output in first.nodes and len(first.nodes) >= 5


def test_sdpa_site_keeps_default_scale_as_none_and_explicit_scale_as_number():
    (default,) = sites_of("sdpa_no_mask")
    (explicit,) = sites_of("sdpa_scale")

    assert default.spelling == "sdpa" and default.scale is None
    assert explicit.scale == pytest.approx(0.2)


def test_tensor_scales_are_folded_into_queries_and_reported_in_notes():
    (buffer_scaled,) = sites_of("scale_by_tensor_buffer")
    (temperature,) = sites_of("learned_temperature")

    assert buffer_scaled.scale == 1.0 and "folded into q" in buffer_scaled.notes
    assert [op for _, op in temperature.replacement.q_factors] == ["div"]


def test_scale_written_on_queries_before_the_product_becomes_the_softmax_scale():
    (site,) = sites_of("scale_on_queries")

    assert site.scale == pytest.approx(HEAD_DIM ** -0.5)


def test_einsum_with_heads_last_is_permuted_to_canonical_layout():
    (site,) = sites_of("einsum_heads_last")

    assert site.spelling == "einsum+softmax"
    assert site.query_shape == (2, 2, 8, 8)
    assert site.replacement.q.permute == (0, 2, 1, 3)
    assert site.replacement.output_permute == (0, 2, 1, 3)


def test_cross_attention_reports_different_query_and_key_lengths():
    (site,) = sites_of("cross_attention_key_padding")

    assert site.query_shape[-2] == 8 and site.key_shape[-2] == 6


def test_a_softmax_that_is_not_attention_is_not_a_site():
    assert sites_of("router_softmax_is_not_attention") == []


def test_unsupported_site_reason_names_what_the_user_can_change():
    (site,) = sites_of("dropout_on_weights_training")

    assert "model.eval()" in site.reason


class CallModuleAttention(nn.Module):
    """Written with nn.Softmax / nn.Dropout modules, as symbolic_trace keeps them (call_module)."""

    def __init__(self):
        super().__init__()
        self.softmax, self.dropout = nn.Softmax(dim=-1), nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.dropout(self.softmax(q @ k.transpose(-2, -1) * 0.5)) @ v


def traced_with_shapes(module, inputs):
    gm = torch.fx.symbolic_trace(module)
    ShapeProp(gm).propagate(*inputs)
    return gm


def test_call_module_softmax_and_dropout_are_matched_in_symbolically_traced_graphs():
    inputs = [torch.randn(2, 2, 8, 4, dtype=torch.float64) for _ in range(3)]
    module = CallModuleAttention().eval()
    gm = traced_with_shapes(module, inputs)

    (site,) = find_attention_sites(gm)
    replace_attention_site(gm, site, F.scaled_dot_product_attention)

    assert site.supported and site.scale == 0.5
    torch.testing.assert_close(gm(*inputs), module(*inputs))


def test_call_module_dropout_in_training_mode_is_kept():
    inputs = [torch.randn(2, 2, 8, 4) for _ in range(3)]
    gm = traced_with_shapes(CallModuleAttention().train(), inputs)

    (site,) = find_attention_sites(gm)

    assert not site.supported and "training mode" in site.reason


def test_graph_without_shape_metadata_is_rejected_with_what_to_do():
    gm = torch.fx.symbolic_trace(CallModuleAttention())

    with pytest.raises(ValueError, match="no shape metadata.*ShapeProp"):
        find_attention_sites(gm)


class _Attend(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"attn": _Attend()}) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer["attn"](x)
        return x


def _passing_arguments_through(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)
    return wrapper


class _WrappedLayers(_Layers):
    forward = _passing_arguments_through(_Layers.forward)  # Dynamo names self L['args'][0]


@pytest.mark.parametrize("how", ["module", "wrapped_forward", "function_argument", "keyword_argument"])
def test_module_paths_are_named_modules_paths_however_the_model_is_reached(how):
    model = _WrappedLayers() if how == "wrapped_forward" else _Layers()
    call = {"module": model, "wrapped_forward": model,
            "function_argument": lambda x, model=model: (lambda m, y: m(y))(model, x),
            "keyword_argument": lambda x: (lambda **kwargs: kwargs["model"](kwargs["x"]))(model=model, x=x)}[how]
    found = []

    def backend(gm, example_inputs):
        found.extend(find_attention_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(call, backend=backend)(torch.randn(2, 4, 8))

    assert [site.module_path for site in found] == ["layers.0.attn", "layers.1.attn"]
    assert all(site.module_path in dict(model.named_modules()) for site in found)


def test_a_sequential_compiled_as_the_root_names_its_children_by_index():
    found = []

    def backend(gm, example_inputs):
        found.extend(find_attention_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(nn.Sequential(_Attend(), _Attend()), backend=backend)(torch.randn(2, 4, 8))

    assert [site.module_path for site in found] == ["0", "1"]
