import math

import pytest
import torch
from torch import nn

import lrcompile
from lrcompile.math import flops
from lrcompile.math.features import feature_dim
from lrcompile.models import gpt2, nanogpt
from lrcompile.ops import algorithm
from lrcompile.ops.attention import default_chunk_size


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_explain_gpt2_reports_each_site_with_its_numbers():
    model, inputs = gpt2(n=32)
    report = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(cost_model=False))
    assert [site.module for site in report.sites] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for site in report.sites:
        assert site.rewritten and site.reason == ""
        assert site.mask == "causal" and site.degree == 2
        assert site.feature_dim == feature_dim(32, 2)
        assert 0 < site.score_range < 10 and 0 < site.error_bound < math.inf
        assert site.flops_exact > 0 and site.flops_lowrank > 0
        assert site.query_shape == (2, 4, 32, 32)
    text = str(report)
    for expected in ("2 attention site(s), 2 rewritten", "module", "mask", "decision", "REWRITTEN", "transformer.h.1.attn"):
        assert expected in text


def test_explain_shows_the_factored_backward_that_inductor_receives():
    model, inputs = nanogpt(n=32, n_layer=1)
    model.train()
    report = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(cost_model=False))
    assert "softmax" in report.graphs["dynamo_before"][0]
    assert "lowrank_attention" in report.graphs["dynamo_after"][0]
    assert "softmax(" not in report.graphs["dynamo_after"][0]  # (the site label still names the node)
    backward = report.graphs["aot_backward"][0]
    assert "_softmax_backward_data" not in backward and "lrcompile.factored_attention_backward" in backward
    assert "lrcompile.factored_attention.default" in report.graphs["aot_forward"][0]
    assert "AOTAutograd backward graph" in report.graph_code()
    torch._dynamo.reset()
    exact = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(exclude=("*",)))
    assert "_softmax_backward_data" in exact.graphs["aot_backward"][0]


def test_explain_runs_no_backward_pass():
    model, inputs = nanogpt(n=32, n_layer=1)
    lrcompile.explain(model.train(), *inputs, policy=lrcompile.Policy(cost_model=False))
    assert all(p.grad is None for p in model.parameters())


def test_kept_sites_say_why():
    model, inputs = gpt2(n=32)
    report = lrcompile.explain(model, *inputs)  # default policy: the cost model keeps n = 32 exact
    assert not any(site.rewritten for site in report.sites)
    assert all("exact attention is cheaper at n_k = 32" in site.reason for site in report.sites)
    assert "kept exact, and why:" in str(report)


def test_model_without_attention_says_so():
    report = lrcompile.explain(nn.Linear(4, 4), torch.randn(2, 4))
    assert report.sites == [] and "no softmax-attention site" in str(report)


def test_explain_reports_a_pattern_that_matches_no_module():
    model, inputs = nanogpt(n=16, n_layer=1)
    policy = lrcompile.Policy(include=("transformer.h.*.attn", "h.0.*"), exclude=("h.9.*",))
    report = lrcompile.explain(model, *inputs, policy=policy)
    assert report.unmatched_patterns == ["transformer.h.*.attn", "h.9.*"]
    text = str(report)
    assert "include pattern 'transformer.h.*.attn' matches no module path" in text
    assert "exclude pattern 'h.9.*' matches no module path" in text
    assert "'h.0.*' matches" not in text


def test_lowrank_flops_are_those_of_the_algorithm_the_op_runs():
    model, inputs = gpt2(n=32)
    n, head_dim, query_heads = 32, 32, 2 * 4
    chunk = default_chunk_size(head_dim, 2, True)
    assert algorithm.uses_direct(n, n, head_dim, head_dim, 1, 2, True, chunk, "cpu")  # short: the n x n block
    report = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(cost_model=False))
    direct = flops.direct_flops(n, n, head_dim, head_dim, query_heads, True)
    assert [(site.algorithm, site.flops_lowrank) for site in report.sites] == [("direct", direct)] * 2
    assert f"{direct / 1e9:.3g} direct" in str(report)

    torch._dynamo.reset()
    with algorithm.algorithm_forced("factored"):
        report = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(cost_model=False))
    factored = flops.lowrank_flops(n, n, head_dim, head_dim, query_heads, True, 2, chunk)
    assert [(site.algorithm, site.flops_lowrank) for site in report.sites] == [("factored", factored)] * 2
    assert f"{factored / 1e9:.3g} factored" in str(report)
