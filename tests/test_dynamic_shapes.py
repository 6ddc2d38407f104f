"""Dynamic shapes: a rewrite decided on symbolic sizes holds for every length its guards admit, and
survives Dynamo's automatic-dynamic recompile and decoding with a KV cache (docs/design.md section 5)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import lrcompile
from lrcompile.compile.backend import compile_graph
from lrcompile.compile.policy import Policy

LENGTHS = (64, 128, 300, 96, 512)
MIN_SEQ_LEN = 256


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Attend(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class CachedAttend(nn.Module):
    """One decoding step: the new key and value are appended to a cache, as in transformers."""

    def forward(self, q, k_new, v_new, k_cache, v_cache):
        k = torch.cat([k_cache, k_new], dim=2)
        v = torch.cat([v_cache, v_new], dim=2)
        return F.scaled_dot_product_attention(q, k, v)


def recording_backend(policy, results):
    """Our rewrite, then AOTAutograd with eager kernels (Inductor's path without its code generation)."""
    def compiler(gm, example_inputs):
        return compile_graph(gm, example_inputs, policy, inner=aot_eager, on_rewrite=results.append)
    return compiler


def attention_inputs(n, n_q=None):
    # Scores of range about 10: degree 2 is far from exp there, so a rewritten call is plain to see
    # (the policies here say on_inaccurate="allow", or the guard would return exact attention).
    torch.manual_seed(n)
    q = torch.randn(1, 2, n if n_q is None else n_q, 16) * 3
    return q, torch.randn(1, 2, n, 16) * 3, torch.randn(1, 2, n, 16)


def is_exact(out, q, k, v):
    return torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def rewritten_lengths(compiled, lengths=LENGTHS):
    with torch.no_grad():
        return [n for n in lengths if not is_exact(compiled(*attention_inputs(n)), *attention_inputs(n))]


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic_dynamic"])
def test_every_length_at_or_above_min_seq_len_is_rewritten(dynamic):
    results = []
    policy = Policy(min_seq_len=MIN_SEQ_LEN, cost_model=False, on_inaccurate="allow")
    compiled = torch.compile(Attend(), backend=recording_backend(policy, results), dynamic=dynamic)

    assert rewritten_lengths(compiled) == [300, 512]
    assert all(decision.rewrite == (not decision.reason.startswith("key length")) for result in results
               for _, decision in result.decisions)


def test_a_static_rewrite_is_kept_by_the_automatic_dynamic_recompile():
    results = []
    compiled = torch.compile(Attend(), backend=recording_backend(Policy(min_seq_len=MIN_SEQ_LEN, cost_model=False, on_inaccurate="allow"),
                                                                  results))

    assert rewritten_lengths(compiled, (300, 512, 96, 64, 1024)) == [300, 512, 1024]
    key_lengths = [site.key_shape[-2] for result in results for site, _ in result.decisions]
    assert key_lengths[0] == 300 and isinstance(key_lengths[1], str)  # 512 recompiled with a symbolic length


def test_key_and_value_appended_to_a_cache_are_rewritten_at_every_cache_length():
    results = []
    # Static first, then Dynamo's automatic-dynamic recompile gives the two caches their own symbols.
    compiled = torch.compile(CachedAttend(), backend=recording_backend(Policy(cost_model=False, on_inaccurate="allow"), results))
    with torch.no_grad():
        for cached in (8, 9, 15):
            q, k, v = attention_inputs(cached + 1, n_q=1)
            out = compiled(q, k[:, :, -1:], v[:, :, -1:], k[:, :, :-1], v[:, :, :-1])
            assert not is_exact(out, q, k, v), cached
    assert len(results) == 2
    assert [decision.reason for result in results for _, decision in result.decisions] == ["", ""]


def test_the_backend_rewrites_lengths_above_min_seq_len_through_inductor():
    compiled = torch.compile(Attend(), backend=lrcompile.backend(Policy(min_seq_len=MIN_SEQ_LEN, cost_model=False, on_inaccurate="allow")),
                             dynamic=True)
    assert rewritten_lengths(compiled) == [300, 512]


transformers = pytest.importorskip("transformers")


def tiny_causal_lm(name):
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0,
            attn_implementation="sdpa")).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")).eval()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_with_a_kv_cache_rewrites_every_decoding_step(name):
    torch.manual_seed(0)
    model = tiny_causal_lm(name)
    results = []
    model.forward = torch.compile(model.forward, backend=recording_backend(Policy(cost_model=False, on_inaccurate="allow"), results))
    with torch.no_grad():
        model.generate(torch.randint(1, 100, (1, 8)), max_new_tokens=5, min_new_tokens=5, do_sample=False)

    decisions = [(site.key_shape, decision) for result in results for site, decision in result.decisions]
    assert any(isinstance(key_shape[-2], str) for key_shape, _ in decisions)  # a symbolic cache length
    assert [decision.reason for _, decision in decisions] == [""] * len(decisions)


class SlidingWindow(nn.Module):
    """A hand-written sliding window of `width` keys: causal while n <= width, a window beyond."""

    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, q, k, v):
        positions = torch.arange(q.shape[-2])
        distance = positions[:, None] - positions[None, :]
        keep = (distance >= 0) & (distance < self.width)
        return (q @ k.transpose(-2, -1) / 4).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def _window_reference(q, k, v, width):
    positions = torch.arange(q.shape[-2])
    distance = positions[:, None] - positions[None, :]
    keep = (distance >= 0) & (distance < width)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep, scale=0.25)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("checked_up_to", [None, 96])
def test_a_sliding_window_is_never_dropped_across_recompiles(dynamic, checked_up_to, monkeypatch):
    """The issue's W = 100, called at 32 and 40 (automatic dynamic, or dynamic=True) and later past W:
    the mask is re-proven over a ladder of lengths, and a shape guard keeps the compiled graph to the
    lengths proven (checked_up_to: a ladder cut short, so that 130 and 180 lie beyond it and recompile)."""
    from passes import masks

    if checked_up_to is not None:
        monkeypatch.setattr(masks, "_LARGEST_CHECKED_PATTERN", checked_up_to ** 2)
    torch._dynamo.reset()
    compiled = torch.compile(SlidingWindow(100), backend=lrcompile.backend(Policy(cost_model=False, degree=4)),
                             dynamic=dynamic)
    generator = torch.Generator().manual_seed(0)
    for n in (32, 40, 101, 130, 180):
        q, k, v = (0.3 * torch.randn(1, 2, n, 16, generator=generator) for _ in range(3))
        expected = _window_reference(q, k, v, 100)
        out = compiled(q, k, v)
        assert (out.double() - expected).abs().max() < 1e-5, n  # exact attention (or degree 4 where causal)
