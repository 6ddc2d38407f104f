"""Built-in example models for the command line and the demo, and loading a user's model.

A MODEL argument is a built-in name (`lrcompile explain gpt2`) or `path/to/file.py:factory`,
where factory() returns (model, example_inputs) with example_inputs a tuple of positional
arguments. Built-ins have random weights (nothing is downloaded); the transformers ones need
the `transformers` package (pip install lrcompile[dev]).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused projection, heads by view/transpose, a causal tril buffer."""

    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.n_head = n_head
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        batch, n, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, n, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v  # (B, H, n, d)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, n, channels))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A small GPT in plain PyTorch (the nanoGPT spelling of attention)."""

    def __init__(self, vocab_size=256, block_size=4096, n_layer=4, n_head=4, n_embd=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt(n=1024, n_layer=4):
    torch.manual_seed(0)
    return NanoGPT(block_size=max(n, 64), n_layer=n_layer).eval(), (torch.randint(0, 256, (1, n)),)


def gpt2(n=256):
    transformers = _transformers()
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=512, n_positions=max(n, 64),
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval(), (torch.randint(0, 512, (2, n)),)


def bert(n=256):
    transformers = _transformers()
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=128,
                                     intermediate_size=256, vocab_size=512, max_position_embeddings=max(n, 64))
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, n))
    padding = torch.ones(2, n, dtype=torch.long)
    padding[1, n // 2:] = 0  # the second sequence is half padding
    return transformers.BertModel(config).eval(), (ids, padding)


def llama(n=256):
    transformers = _transformers()
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=128, intermediate_size=256, vocab_size=512,
                                      max_position_embeddings=max(n, 64))
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), (torch.randint(0, 512, (2, n)),)


BUILT_IN = {"nanogpt": nanogpt, "gpt2": gpt2, "bert": bert, "llama": llama}


def load_model(spec: str, n: int | None = None):
    """(model, example_inputs) for a built-in name or `path/to/file.py:factory`."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]() if n is None else BUILT_IN[spec](n)
    path, _, factory = spec.partition(":")
    if not factory or not path.endswith(".py"):
        raise ValueError(f"MODEL must be one of {sorted(BUILT_IN)} or path/to/file.py:factory, got {spec!r}")
    if not Path(path).is_file():
        raise ValueError(f"no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, factory):
        raise ValueError(f"{path} defines no {factory!r}")
    result = getattr(module, factory)()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ValueError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def first_tensor(output):
    """The main tensor of a model's output (logits, last_hidden_state, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    raise TypeError(f"cannot find a tensor in a model output of type {type(output).__name__}")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit("this built-in model needs transformers: pip install 'lrcompile[dev]'") from None
    return transformers
