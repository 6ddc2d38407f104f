"""replace_attention_site: replacing with F.scaled_dot_product_attention reproduces the original."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

from attention_corpus import (
    BATCH, CASES, CASES_BY_NAME, DIM, Heads, capture_one_graph, replacing_backend,
)
from passes import find_attention_sites, replace_attention_site

REPLAYABLE = [case for case in CASES if not case.training]


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def tolerance(dtype):
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("case", REPLAYABLE, ids=lambda case: case.name)
def test_replacing_supported_sites_with_sdpa_reproduces_the_outputs(case):
    module, inputs = case.build()
    replaced = []

    torch._dynamo.reset()
    with torch.no_grad():
        expected = module(*inputs)
        actual = torch.compile(module, backend=replacing_backend(replaced=replaced))(*inputs)

    assert replaced == [sum(case.expected.supported)]
    for got, want in zip(as_tuple(actual), as_tuple(expected)):
        torch.testing.assert_close(got, want, **tolerance(case.dtype))


@pytest.mark.parametrize("name", ["causal_and_key_padding", "gqa_expand_reshape", "learned_temperature"])
def test_replaced_graph_compiles_with_inductor_forward_and_backward(name):
    module, inputs = CASES_BY_NAME[name].build()
    module = module.float()
    inputs = tuple(t.float().requires_grad_() if t.is_floating_point() else t for t in inputs)
    module(*inputs).square().sum().backward()
    expected_grads = [p.grad.clone() for p in module.parameters()] + [inputs[0].grad.clone()]
    module.zero_grad()
    inputs[0].grad = None
    replaced = []

    torch._dynamo.reset()
    out = torch.compile(module, backend=replacing_backend(compile_fx, replaced=replaced))(*inputs)
    out.square().sum().backward()

    assert replaced == [1]
    torch.testing.assert_close(out, module(*inputs), atol=1e-5, rtol=1e-5)
    for got, want in zip([p.grad for p in module.parameters()] + [inputs[0].grad], expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["nanogpt_causal_buffer", "causal_and_key_padding", "gqa_expand_reshape"])
def test_replacement_with_dynamic_shapes_matches_eager_at_several_lengths(name):
    module, _ = CASES_BY_NAME[name].build()
    compiled = torch.compile(module, backend=replacing_backend(), dynamic=True)
    torch._dynamo.reset()

    for length in (8, 11, 14):
        x = torch.randn(BATCH, length, DIM, dtype=torch.float64)
        keep = torch.ones(BATCH, length, dtype=torch.bool)
        keep[0, -2:] = False
        inputs = (x, keep) if name == "causal_and_key_padding" else (x,)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs), module(*inputs), **tolerance(torch.float64))


def test_unsupported_site_raises_value_error_with_its_reason():
    module, inputs = CASES_BY_NAME["returned_weights"].build()
    captured = capture_one_graph(module, inputs)

    with pytest.raises(ValueError, match="not supported: attention weights are returned"):
        replace_attention_site(captured.gm, captured.sites[0], F.scaled_dot_product_attention)


def test_replacing_the_same_site_twice_raises():
    module, inputs = CASES_BY_NAME["sdpa_is_causal"].build()
    captured = capture_one_graph(module, inputs)
    replace_attention_site(captured.gm, captured.sites[0], F.scaled_dot_product_attention)

    with pytest.raises(ValueError, match="already replaced"):
        replace_attention_site(captured.gm, captured.sites[0], F.scaled_dot_product_attention)


class Chained(Heads):
    """The second attention's queries are the first attention's output node itself."""

    def attend(self, q, k, v):
        first = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return (first @ k.transpose(-2, -1)).softmax(-1) @ v


@pytest.mark.parametrize("order", [1, -1], ids=["in_graph_order", "reversed"])
def test_sites_found_before_replacing_stay_replaceable_in_any_order(order):
    module = Chained().double().eval()
    inputs = (torch.randn(BATCH, 8, DIM, dtype=torch.float64),)

    def backend(gm, example_inputs):
        for site in find_attention_sites(gm)[::order]:
            replace_attention_site(gm, site, F.scaled_dot_product_attention)
        assert not [n for n in gm.graph.nodes if n.target in (torch.nn.functional.softmax, "softmax")]
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(module, backend=backend)(*inputs), module(*inputs))


def test_replacement_removes_the_subgraph_and_its_private_mask_construction():
    module, inputs = CASES_BY_NAME["nanogpt_causal_buffer"].build()
    captured = capture_one_graph(module, inputs)
    gm, (site,) = captured.gm, captured.sites
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    replace_attention_site(gm, site, F.scaled_dot_product_attention)

    targets = [n.target for n in gm.graph.nodes]
    assert "masked_fill" not in targets and operator.eq not in targets and F.softmax not in targets
    assert [n for n in gm.graph.nodes if n.op == "placeholder"] == placeholders
    assert targets.count(F.scaled_dot_product_attention) == 1
    gm.graph.lint()


def test_new_nodes_carry_module_path_stack_trace_and_fake_values():
    module, inputs = CASES_BY_NAME["two_layers"].build()
    captured = capture_one_graph(module, inputs)
    gm = captured.gm
    first_output = captured.sites[0].output
    stack = first_output.meta["nn_module_stack"]

    replace_attention_site(gm, captured.sites[0], F.scaled_dot_product_attention)

    (call,) = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert call.meta["nn_module_stack"] == stack and "stack_trace" in call.meta
    assert tuple(call.meta["example_value"].shape) == (2, 2, 8, 8)


class ModelMutatingABuffer(Heads):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def attend(self, q, k, v):
        self.calls.add_(1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_in_place_updates_elsewhere_in_the_graph_survive_the_replacement():
    module = ModelMutatingABuffer().double().eval()
    inputs = (torch.randn(BATCH, 8, DIM, dtype=torch.float64),)
    replaced = []

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=replacing_backend(replaced=replaced))(*inputs)

    assert replaced == [1] and module.calls.item() == 1.0


def recording_attention(calls):
    def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, degree=None):
        calls.append({"q": q.shape, "k": k.shape, "v": v.shape, "is_causal": is_causal, "scale": scale,
                      "enable_gqa": enable_gqa, "degree": degree,
                      "mask": None if attn_mask is None else (attn_mask.shape, attn_mask.dtype)})
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    return attention


@pytest.mark.parametrize("name, expected", [
    ("einsum_heads_last", {"q": (2, 2, 8, 8), "v": (2, 2, 8, 8), "mask": None}),
    ("gqa_repeat_interleave", {"q": (2, 4, 8, 8), "k": (2, 2, 8, 8), "enable_gqa": True}),
    ("causal_and_key_padding", {"is_causal": True, "mask": ((2, 1, 1, 8), torch.float64)}),
    ("masked_fill_key_padding", {"is_causal": False, "mask": ((2, 1, 1, 8), torch.bool)}),
    ("cross_attention_key_padding", {"q": (2, 2, 8, 8), "k": (2, 2, 6, 8), "mask": ((2, 1, 1, 6), torch.bool)}),
    ("matmul_permute_divide", {"scale": 8 ** -0.5}),
])
def test_attention_fn_receives_canonical_tensors_mask_and_extra_kwargs(name, expected):
    module, inputs = CASES_BY_NAME[name].build()
    captured = capture_one_graph(module, inputs)
    calls = []

    replace_attention_site(captured.gm, captured.sites[0], recording_attention(calls), degree=2)
    with torch.no_grad():
        captured.gm(*captured.example_inputs)

    call = calls[-1]  # earlier calls ran on fake tensors, to record the new node's example_value
    assert call["degree"] == 2
    for key, value in expected.items():
        if key == "scale":
            assert call[key] == pytest.approx(value)
        else:
            assert (tuple(call[key]) if key in "qkv" else call[key]) == value, key


class FiniteFillAttention(torch.nn.Module):
    """Key padding written as many models write it: the removed scores set to a finite value."""

    def __init__(self, fill, additive):
        super().__init__()
        self.fill, self.additive = fill, additive

    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if self.additive:  # transformers: scores + where(keep, 0, finfo.min)
            scores = scores + torch.zeros_like(scores[:, :1, :1]).masked_fill(~keep, self.fill)
        else:  # scores.masked_fill(~keep, -1e9)
            scores = scores.masked_fill(~keep, self.fill)
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("fill, additive", [(-1e9, False), (torch.finfo(torch.float64).min, True)])
def test_a_finite_fill_that_removes_every_key_averages_the_values_as_the_original_does(fill, additive):
    """A row whose keys are all removed by a finite fill is the plain average of the values in the
    original graph (its scores are all the fill), not an empty row: the replacement passes a float
    mask that keeps that, where a boolean one would give zeros."""
    import lrcompile

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(2, 2, 6, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., 4:] = False
    keep[1] = False  # a whole sequence of padding
    module = FiniteFillAttention(fill, additive)
    policy = lrcompile.Policy(degree=6, cost_model=False, on_inaccurate="allow")
    with torch.no_grad():
        got = torch.compile(module, backend=lrcompile.backend(policy))(q, k, v, keep)
        expected = module(q, k, v, keep)
    torch.testing.assert_close(expected[1], v[1].mean(-2, keepdim=True).expand_as(expected[1]))
    assert (got - expected).abs().max().item() < 1e-6  # degree 6 on scores within 0.3
