"""A small GPT (nanoGPT's architecture, plain PyTorch), to train or benchmark with lrcompile.

    import lrcompile
    from examples.gpt import build

    model = build(n_layer=4, n_embd=256, n_head=4, block_size=4096)
    model = torch.compile(model, backend=lrcompile.backend(lrcompile.Policy(cost_model=False)))
    logits, loss = model(tokens, targets)          # tokens, targets: (batch, n) int64

Attention is written as nanoGPT writes it where PyTorch has a fused kernel:
F.scaled_dot_product_attention(q, k, v, is_causal=True). lrcompile finds that site (and the
explicit softmax spelling of nanoGPT's fallback path alike) and rewrites it. Dropout is 0 by
default: dropout on the attention weights in training keeps a site exact (DESIGN.md, section 5).

    python examples/gpt.py          # one training step, eager and compiled by lrcompile
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence (positional embeddings)
    vocab_size: int = 256  # bytes: keeps the output layer small next to attention at long n
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        batch, n, channels = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(batch, n, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, n, d)
        y = y.transpose(1, 2).contiguous().view(batch, n, channels)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx, targets: (B, n) token ids. Returns (logits (B, n, vocab), loss or None)."""
        n = idx.shape[1]
        if n > self.config.block_size:
            raise ValueError(f"sequence of length {n} is longer than block_size {self.config.block_size}")
        positions = torch.arange(n, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        return logits, loss


def build(n_layer=4, n_embd=256, n_head=4, block_size=1024, vocab_size=256, dropout=0.0, bias=False,
          seed=0) -> GPT:
    """A freshly initialised GPT; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, dropout=dropout, bias=bias))


def example(n: int = 256, batch: int = 1):
    """(model, example_inputs) for `lrcompile explain examples/gpt.py:example`."""
    model = build(block_size=n)
    tokens = torch.randint(0, model.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(0))
    return model, (tokens,)


if __name__ == "__main__":
    import lrcompile

    model, (tokens,) = example(256)
    targets = tokens.roll(-1, dims=1)
    _, eager_loss = model(tokens, targets)
    compiled = torch.compile(model, backend=lrcompile.backend(lrcompile.Policy(cost_model=False)))
    _, loss = compiled(tokens, targets)
    loss.backward()
    print(f"loss: eager exact attention {eager_loss.item():.4f}, lrcompile {loss.item():.4f}")
