"""Attention inside the bodies of higher-order ops: activation checkpointing, nested_compile_region.

Dynamo puts a checkpointed block in a `tag_activation_checkpoint` body (a GraphModule attribute
of the graph); sites there must be found, named after the module that wrote them, measured,
rewritten inside the body, and compiled with correct forward and gradients. Scores are kept
below about 0.5 in magnitude, where degree 4 is within ~1e-5 of exp, so the rewritten model
agrees with exact attention to 1e-3 while the call really is the low-rank op.
"""

import contextlib
import functools

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import lrcompile
from lrcompile.compile.backend import compile_graph, rewrite_graph, score_ranges
from lrcompile.models import Block
from lrcompile.compile.policy import Policy
from passes import find_attention_sites
from passes.higher_order import bodies, code_with_bodies

POLICY = Policy(degree=4, cost_model=False)
TOLERANCE = 1e-3
checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class CheckpointedGPT(nn.Module):
    """nanoGPT blocks, each run through activation checkpointing from the model's forward."""

    def __init__(self, layers=2, n_embd=32, n_head=4, block_size=16):
        super().__init__()
        self.h = nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(layers))

    def forward(self, x):
        for block in self.h:
            x = checkpoint(block, x)
        return x


class CheckpointedAttentionBlock(Block):
    """Checkpointing called inside a module's own forward, on its attention only."""

    def forward(self, x):
        x = x + checkpoint(self.attn, self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class InnerCheckpointGPT(CheckpointedGPT):
    def __init__(self, layers=2, n_embd=32, n_head=4, block_size=16):
        nn.Module.__init__(self)
        self.h = nn.ModuleList(CheckpointedAttentionBlock(n_embd, n_head, block_size) for _ in range(layers))

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return x


class RegionBlock(Block):
    @torch.compiler.nested_compile_region
    def forward(self, x):
        return super().forward(x)


class RegionGPT(InnerCheckpointGPT):
    def __init__(self, layers=2, n_embd=32, n_head=4, block_size=16):
        nn.Module.__init__(self)
        self.h = nn.ModuleList(RegionBlock(n_embd, n_head, block_size) for _ in range(layers))


def small_scores(model):
    """Shrink the q/k projections so that |scores| stays well below 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.weight.mul_(0.4)
    return model


def build(model_class, dtype=torch.float64):
    torch.manual_seed(0)
    model = small_scores(model_class()).to(dtype).train()
    torch.manual_seed(1)
    return model, torch.randn(2, 8, 32, dtype=dtype)


def recording_backend(policy, rewrites, inner=aot_eager):
    def compiler(gm, example_inputs):
        return compile_graph(gm, example_inputs, policy, inner=inner, on_rewrite=rewrites.append)
    return compiler


def loss_and_grads(module, *args, **kwargs):
    module.zero_grad()
    out = module(*args, **kwargs)
    out = getattr(out, "last_hidden_state", out)
    (out ** 2).sum().backward()
    return out.detach(), {name.removeprefix("_orig_mod."): p.grad.clone()
                          for name, p in module.named_parameters() if p.grad is not None}


def assert_matches_exact(compiled, eager, *args, **kwargs):
    out, grads = loss_and_grads(compiled, *args, **kwargs)
    expected, expected_grads = loss_and_grads(eager, *args, **kwargs)
    assert (out - expected).abs().max() <= TOLERANCE * max(1.0, expected.abs().max())
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        scale = max(1.0, expected_grads[name].abs().max().item())
        assert (grad - expected_grads[name]).abs().max() <= TOLERANCE * scale, name


def rewritten_sites(rewrites):
    return [site for rewrite in rewrites for site in rewrite.rewritten]


# ---------------------------------------------------------------------------------------------
# Finding


@pytest.mark.parametrize("model_class", [CheckpointedGPT, InnerCheckpointGPT])
def test_explain_reports_sites_inside_checkpointed_blocks_with_module_paths(model_class):
    model, x = build(model_class)
    report = lrcompile.explain(model, x, policy=POLICY)
    assert [site.module for site in report.sites] == ["h.0.attn", "h.1.attn"]
    assert all(site.rewritten and site.mask == "causal" for site in report.sites)
    # the score-range probe ran inside the bodies
    assert all(site.score_range is not None and 0 < site.score_range < 0.6 for site in report.sites)
    assert report.graphs["dynamo_after"][0].count("lowrank_attention(") == 2


def dynamo_graph(model, *args, **kwargs):
    """(the first Dynamo graph, its example inputs), captured while its metadata is still there."""
    captured = []

    def capture(gm, example_inputs):
        if not captured:
            captured.append((gm, example_inputs, [site for site in find_attention_sites(gm)]))
        return gm.forward

    torch.compile(model, backend=capture)(*args, **kwargs)
    return captured[0]


def test_body_sites_are_named_after_their_body_and_proven_causal_through_the_call():
    model, x = build(CheckpointedGPT)
    gm, _, sites = dynamo_graph(model, x)
    assert [body.attribute for body in bodies(gm)] == ["wrap_body_0", "wrap_body_1"]
    assert [site.name for site in sites] == ["wrap_body_0.softmax", "wrap_body_1.softmax"]
    # the causal buffer is a placeholder of the body: proven from what the call passes
    assert all(site.supported and site.mask == "causal" for site in sites), [site.reason for site in sites]


def test_rewriting_a_copy_leaves_the_original_bodies_untouched():
    model, x = build(CheckpointedGPT)
    results = []

    def backend(gm, example_inputs):
        before = code_with_bodies(gm)
        results.append((rewrite_graph(gm, example_inputs, POLICY), before, code_with_bodies(gm),
                        score_ranges(gm, example_inputs)))
        return gm.forward

    torch.compile(model, backend=backend)(x)
    rewrite, before, after, ranges = results[0]
    assert len(rewrite.rewritten) == 2 and rewrite.code_after.count("lowrank_attention(") == 2
    assert after == before and "lowrank_attention(" not in after
    assert sorted(ranges) == ["wrap_body_0.softmax", "wrap_body_1.softmax"]


# ---------------------------------------------------------------------------------------------
# Compiling: forward and gradients


@pytest.mark.parametrize("model_class", [CheckpointedGPT, InnerCheckpointGPT])
def test_checkpointed_training_matches_exact_attention(model_class):
    model, x = build(model_class)
    rewrites = []
    compiled = torch.compile(model, backend=recording_backend(POLICY, rewrites))
    assert_matches_exact(compiled, model, x)
    assert [site.module_path for site in rewritten_sites(rewrites)] == ["h.0.attn", "h.1.attn"]


@pytest.mark.slow  # Inductor's code generation for forward and backward: about a minute on CPU
def test_inductor_compiles_lowrank_attention_inside_checkpointed_blocks():
    model, x = build(functools.partial(CheckpointedGPT, layers=1))
    rewrites = []
    compiled = torch.compile(model, backend=recording_backend(POLICY, rewrites, inner=None))
    assert_matches_exact(compiled, model, x)
    assert len(rewritten_sites(rewrites)) == 1
    assert "lowrank_attention(" in rewrites[0].code_after


def test_nested_compile_region_body_shared_by_calls_is_rewritten_once_for_all():
    model, x = build(RegionGPT)
    x.requires_grad_()  # Dynamo inlines the region when nothing needs a gradient
    rewrites = []
    compiled = torch.compile(model, backend=recording_backend(POLICY, rewrites))
    assert_matches_exact(compiled, model, x)
    sites = rewritten_sites(rewrites)
    # one body serves both layers; the causal buffers differ per layer but hold equal values
    assert len(sites) == 1 and sites[0].mask == "causal"
    assert "shared by 2 calls" in sites[0].notes


# ---------------------------------------------------------------------------------------------
# transformers: model.gradient_checkpointing_enable()


def transformers_model(name, implementation):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100, bos_token_id=0, eos_token_id=0,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=implementation)
        model = transformers.GPT2Model(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100, attn_implementation=implementation)
        model = transformers.LlamaModel(config)
    model = model.double()
    model.gradient_checkpointing_enable()
    return model.train()


def side_effects_under_checkpoint_allowed():
    """transformers 5 sets a context variable inside every checkpointed layer (its `kernels` layer);
    Dynamo refuses that side effect under checkpoint, and the layers run eagerly, unless told it
    need not be replayed when the backward recomputes the forward. This is the setting a user sets."""
    config = torch._dynamo.config
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    return contextlib.nullcontext()


@pytest.mark.parametrize("name, implementation", [
    ("gpt2", "eager"),
    pytest.param("gpt2", "sdpa", marks=pytest.mark.slow),
    pytest.param("llama", "eager", marks=pytest.mark.slow),
    pytest.param("llama", "sdpa", marks=pytest.mark.slow),
])
def test_transformers_gradient_checkpointing_sites_are_rewritten_and_gradients_match(name, implementation):
    model = transformers_model(name, implementation)
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 8))
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, -3:] = 0  # built outside the checkpointed layers, imported into each body
    rewrites = []
    compiled = torch.compile(model, backend=recording_backend(POLICY, rewrites))
    with side_effects_under_checkpoint_allowed():
        assert_matches_exact(compiled, model, input_ids=ids, attention_mask=padding)
    decisions = [(site, decision) for rewrite in rewrites for site, decision in rewrite.decisions]
    assert len(decisions) == 2 and all(decision.rewrite for _, decision in decisions)
    assert all(site.name.startswith("wrap_body_") for site, _ in decisions)
    assert all(site.mask == "causal+key_padding" for site, _ in decisions)
    layers = "h.{}.attn" if name == "gpt2" else "layers.{}.self_attn"
    assert [site.module_path for site, _ in decisions] == [layers.format(0), layers.format(1)]


class SideEffectInCheckpointedAttention(nn.Module):
    """A checkpointed block that writes to an object outside it, as transformers 5's layers do."""

    def __init__(self):
        super().__init__()
        self.attn = CheckpointedGPT(layers=1).h[0].attn
        self.calls = Counter()

    def forward(self, x):
        return checkpoint(self._block, x)

    def _block(self, x):
        self.calls.value += 1
        return self.attn(x)


class Counter:
    value = 0


def test_explain_names_the_graph_breaks_that_kept_attention_out_of_the_compiled_graphs():
    model = SideEffectInCheckpointedAttention()
    x = torch.randn(2, 16, 32) * 0.3
    report = lrcompile.explain(model, x, policy=POLICY)
    if report.sites:
        pytest.skip("this torch traces side effects under checkpoint: nothing was hidden")
    text = str(report)
    assert report.graph_breaks and "no softmax-attention site reached the compiled graphs" in text
    assert "ran eagerly" in text and "no softmax-attention site found" not in text
