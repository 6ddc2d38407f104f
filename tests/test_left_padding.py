"""Left-padded batches through a compiled Llama: padded query rows see no key.

transformers masks left padding with finfo.min (eager) or a boolean mask (sdpa); the passes turn
either into is_causal plus a key-padding mask, under which the first rows of a padded sequence
have no key to attend to. Those rows must stay finite (zeros, as SDPA gives), or the next layer
multiplies NaN by a zero key weight and every row of the sequence turns NaN.

Score range: small-norm weights (initializer_range 0.02) keep every |s q.k| below ~0.01, where
the degree-4 Taylor polynomial's relative error is ~1e-12; the tolerance below is float32
rounding through two layers.
"""

import pytest
import torch

import lrcompile

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # whole models, compiled

VOCAB = 100


def llama(implementation):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, initializer_range=0.02, attn_implementation=implementation, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def left_padded_batch():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, attention_mask


def compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, backend=lrcompile.backend(lrcompile.Policy(degree=4, cost_model=False)))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_left_padded_llama_matches_exact_on_the_tokens(implementation):
    model = llama(implementation)
    ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=attention_mask).logits
        rewritten = compiled(model)(input_ids=ids, attention_mask=attention_mask).logits
    assert torch.isfinite(rewritten).all()
    tokens = attention_mask.bool()
    assert (rewritten - exact)[tokens].abs().max() < 1e-4


def test_left_padded_llama_trains_with_finite_gradients():
    model = llama("eager").train()
    ids, attention_mask = left_padded_batch()
    loss = compiled(model)(input_ids=ids, attention_mask=attention_mask, labels=ids.masked_fill(ids == 0, -100)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batched_generate_with_left_padding_gives_the_exact_tokens():
    model = llama("eager")
    ids, attention_mask = left_padded_batch()
    settings = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        exact = model.generate(ids, **settings)
        model.forward = compiled(model.forward)
        rewritten = model.generate(ids, **settings)
    assert torch.equal(rewritten, exact)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_left_padded_training_step_matches_exact_including_the_padding_rows_in_the_loss(implementation):
    """transformers' eager mask removes later keys with finfo.min, not -inf: a left-padded row, which
    sees only padding, then averages every key of the sequence, and its gradient reaches q and k
    through the scores the forward rounded away. Under the loss's shift the last padding position
    predicts the first token, so that row is in the loss. The rewrite averaged the visible keys
    (is_causal) and gave q, k no gradient there: 7.6% of this model's gradient norm, before."""
    model = llama(implementation).train()
    reference = llama(implementation).train()
    ids, attention_mask = left_padded_batch()
    labels = ids.masked_fill(attention_mask == 0, -100)  # the first token's label stays in
    exact_loss = reference(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    exact_loss.backward()
    lrcompile.reset_stats()
    loss = compiled(model)(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    assert all(s.calls == 1 and s.fallbacks == 0 for s in lrcompile.stats().values())
    assert abs(loss.item() - exact_loss.item()) < 1e-5
    for parameter, exact in zip(model.parameters(), reference.parameters()):
        if exact.grad is not None:
            assert (parameter.grad - exact.grad).abs().max() <= 1e-4 * exact.grad.abs().max() + 1e-9


def test_checkpointed_layers_under_dynamic_shapes_say_how_to_keep_dropout_a_number():
    """With dynamic=True and activation checkpointing, Dynamo passes Llama's dropout (0.0) into each
    layer as a tensor read by .item(): the site cannot see a 0 and is kept, naming the Dynamo setting
    that keeps the float a number; with it, both sites are rewritten. (torch's config.patch, not
    monkeypatch: undoing an attribute a config module does not hold in its __dict__ deletes it.)"""
    from lrcompile.compile.backend import compile_graph

    ids, attention_mask = left_padded_batch()
    policy = lrcompile.Policy(degree=4, cost_model=False)
    for specialize in (False, True):
        model = llama("sdpa").train()
        model.gradient_checkpointing_enable()
        decisions = []
        torch._dynamo.reset()
        compiled = torch.compile(model, dynamic=True, backend=lambda gm, example_inputs: compile_graph(
            gm, example_inputs, policy, on_rewrite=lambda result: decisions.extend(result.decisions)))
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True,
                                        specialize_float=specialize):
            compiled(input_ids=ids, attention_mask=attention_mask, labels=ids)
        assert len(decisions) >= 2
        if specialize:
            assert all(decision.rewrite for _, decision in decisions)
        else:
            assert all(not decision.rewrite and "specialize_float = True" in decision.reason
                       for _, decision in decisions)
