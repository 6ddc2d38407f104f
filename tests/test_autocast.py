"""Mixed precision as users train: float32 weights under bfloat16 autocast, compiled by lrcompile.

Under autocast the projections hand attention bfloat16 q, k, v while masks and the softmax
around them may stay float32; the rewritten sites must take that mix, run (the guard counts their
calls and finds nothing to fall back on), and give the loss and gradients of the exact model under
the same autocast. On the CPU here; on CUDA the same graphs reach the Triton op
(benchmarks/gpu_check.py).

Score range: initializer_range 0.02 keeps every |s q.k| below ~0.05, where the degree-4
polynomial's relative error is below 1e-9: what differs from the exact model is bfloat16
rounding, which moves Inductor's own exact gradients 4e-3 from eager's here. Tolerances: 1e-2
relative on the loss and 3e-2 on the gradients' norm.
"""

import copy

import pytest
import torch

import lrcompile

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # whole models, compiled

VOCAB, N = 100, 64


def model(family, implementation):
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=VOCAB, initializer_range=0.02, attn_implementation=implementation, pad_token_id=0)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=N,
                                     initializer_range=0.02, attn_implementation=implementation, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def left_padded_batch():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(3, VOCAB, (2, N), generator=generator)
    attention_mask = torch.ones(2, N, dtype=torch.long)
    attention_mask[1, :5] = 0
    return ids, attention_mask, ids.masked_fill(attention_mask == 0, -100)


def training_step(module, ids, attention_mask, labels):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return loss.detach().float()


def gradients(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_bfloat16_autocast_training_step_runs_the_rewritten_sites_and_matches_exact(family, implementation):
    """Llama's q and k reach attention in float32 (its rotary embedding promotes them), v in bfloat16:
    kept exact as "different dtypes" before the sites took autocast's dtype."""
    exact_model = model(family, implementation)
    rewritten_model = copy.deepcopy(exact_model)
    batch = left_padded_batch()
    exact_loss = training_step(exact_model, *batch)

    torch._dynamo.reset()
    lrcompile.reset_stats()
    compiled = torch.compile(rewritten_model, backend=lrcompile.backend(lrcompile.Policy(degree=4, cost_model=False)))
    loss = training_step(compiled, *batch)

    stats = lrcompile.stats()
    assert len(stats) == 2 and all(s.calls == 1 and s.fallbacks == 0 and s.backward_fallbacks == 0
                                   and s.compile_failures == 0 for s in stats.values()), stats
    assert abs(loss - exact_loss) <= 1e-2 * abs(exact_loss)
    exact_gradients = gradients(exact_model)
    assert (gradients(rewritten_model) - exact_gradients).norm() <= 3e-2 * exact_gradients.norm()
