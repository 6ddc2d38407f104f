"""Escape analysis: scores or weights read outside a site keep it exact, unless the read is dead."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

from lrcompile.compile.backend import compile_graph
from lrcompile.compile.policy import Policy
from passes import find_attention_sites, replace_attention_site

POLICY = Policy(degree=4, cost_model=False)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class RecordsScores(nn.Module):
    """Copies its scores into a record, as x-transformers does; `keep` says whether it returns it."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.5
        record = scores.clone()
        out = F.softmax(scores, dim=-1) @ v
        return (out, record) if self.keep else out


def dynamo_sites(module, *inputs):
    found = []

    def capture(gm, example_inputs):
        found.append((gm, find_attention_sites(gm)))
        return gm.forward

    torch.compile(module, backend=capture)(*inputs)
    return found[0]


def qkv():
    torch.manual_seed(0)
    return tuple(0.5 * torch.randn(2, 4, 8, 16, dtype=torch.float64) for _ in range(3))


def test_a_dead_copy_of_the_scores_does_not_keep_the_site_and_is_erased_with_it():
    inputs = qkv()
    replaced = []

    def replace_every_site(gm, example_inputs):
        sites = find_attention_sites(gm)
        assert len(sites) == 1 and sites[0].supported, sites[0].reason
        replace_attention_site(gm, sites[0], F.scaled_dot_product_attention)
        replaced.append(gm)
        return gm.forward

    out = torch.compile(RecordsScores(keep=False), backend=replace_every_site)(*inputs)
    assert not any(node.target == "clone" for node in replaced[0].graph.nodes)
    torch.testing.assert_close(out, RecordsScores(keep=False)(*inputs))


def test_a_copy_of_the_scores_that_is_returned_keeps_the_site():
    _, sites = dynamo_sites(RecordsScores(keep=True), *qkv())
    assert len(sites) == 1 and not sites[0].supported
    assert "also used by" in sites[0].reason


@pytest.mark.parametrize("layers", ["Decoder", pytest.param("Encoder", marks=pytest.mark.slow)])
def test_x_transformers_sites_are_rewritten_and_match_exact_attention(layers):
    x_transformers = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = x_transformers.TransformerWrapper(
        num_tokens=100, max_seq_len=32,
        attn_layers=getattr(x_transformers, layers)(dim=64, depth=2, heads=4, attn_dim_head=16)).double().eval()
    with torch.no_grad():  # |scores| well below 1, where degree 4 is close to exp
        for name, parameter in model.named_parameters():
            if name.endswith("to_q.weight"):
                parameter.mul_(0.2)
    ids = torch.randint(0, 100, (2, 16))
    rewrites = []
    compiled = torch.compile(model, backend=lambda gm, example_inputs: compile_graph(
        gm, example_inputs, POLICY, inner=aot_eager, on_rewrite=rewrites.append))
    out = compiled(ids)
    decisions = [(site, decision) for rewrite in rewrites for site, decision in rewrite.decisions]
    assert len(decisions) == 2 and all(decision.rewrite for _, decision in decisions), \
        [site.reason for site, _ in decisions]
    assert {site.mask for site, _ in decisions} == {"causal" if layers == "Decoder" else "none"}
    expected = model(ids)
    assert (out - expected).abs().max() <= 1e-3 * max(1.0, expected.abs().max())
