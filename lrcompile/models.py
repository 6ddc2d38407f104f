"""The project's small GPT, the built-in models of the command line, and loading a user's model.

`GPT(GPTConfig(...))` is nanoGPT's model, the one GPT of the project: the `nanogpt` built-in,
the model of benchmarks/model_speed.py (`build`) and of the examples. `attention="matmul" | "sdpa"`
chooses how its attention is written, so that both spellings are exercised on one model.

A MODEL argument is a built-in name (`lrcompile explain gpt2`) or `path/to/file.py:factory`,
where factory() returns (model, example_inputs) with example_inputs a tuple of positional
arguments. Built-ins have random weights (nothing is downloaded); the transformers ones need
the `transformers` package (pip install lrcompile[dev]).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


ATTENTION = ("matmul", "sdpa")


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence (positional embeddings)
    vocab_size: int = 256  # bytes: keeps the output layer small next to attention at long n
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and layer norms, as GPT-2
    attention: str = "matmul"  # "matmul": q @ k^T, masked_fill, softmax; "sdpa": F.scaled_dot_product_attention


def _dropout(p: float) -> nn.Module:
    # A float read in forward, even a dropout probability of 0, is traced by Dynamo under
    # dynamic=True as a graph input and then specialised: one compile more. Without dropout the
    # model reads none.
    return nn.Dropout(p) if p else nn.Identity()


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused projection, heads by view/transpose, causal.

    attention="matmul" is nanoGPT's explicit path (a tril buffer, masked_fill, softmax),
    attention="sdpa" its fused one (F.scaled_dot_product_attention(is_causal=True)). lrcompile
    finds and rewrites both.
    """

    def __init__(self, n_embd, n_head, block_size, *, attention="matmul", dropout=0.0, bias=True):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.n_head, self.attention = n_head, attention
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout) if dropout else None  # on the weights; see _dropout
        self.resid_dropout = _dropout(dropout)
        if attention == "matmul":
            mask = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
            self.register_buffer("bias", mask)

    def forward(self, x):
        batch, n, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, n, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Dropout on the attention weights keeps the site exact in training (docs/design.md section 4).
        drop = self.attn_dropout is not None and self.training
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout.p if drop else 0.0,
                                               is_causal=True)  # (B, H, n, d)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
            if drop:
                y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
            else:
                y = F.softmax(att, dim=-1) @ v  # (B, H, n, d)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(batch, n, channels)))


class MLP(nn.Module):
    def __init__(self, n_embd, *, dropout=0.0, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = _dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, *, attention="matmul", dropout=0.0, bias=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, attention=attention, dropout=dropout, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model in plain PyTorch: GPT-2's architecture, initialisation and weight tying.

    model(idx) returns the logits (B, n, vocab); model(idx, targets) returns (logits, loss), the
    cross-entropy against targets, so that a compiled training step includes the loss.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = _dropout(config.dropout)
        self.h = nn.ModuleList(Block(config.n_embd, config.n_head, config.block_size, attention=config.attention,
                                     dropout=config.dropout, bias=config.bias) for _ in range(config.n_layer))
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

    def forward(self, idx, targets=None, position_offset: int = 0):
        """idx, targets: (B, n) token ids, at positions position_offset.. (a rank's slice of the
        sequence under context parallelism, lrcompile.ops.context_parallel)."""
        n = idx.shape[1]
        if position_offset + n > self.config.block_size:
            raise ValueError(f"positions up to {position_offset + n} are beyond block_size {self.config.block_size}")
        positions = torch.arange(position_offset, position_offset + n, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build(n_layer=4, n_embd=256, n_head=4, block_size=1024, vocab_size=256, dropout=0.0, bias=False,
          attention="sdpa", seed=0) -> GPT:
    """A freshly initialised GPT (the model of benchmarks/model_speed.py); the same seed gives the same weights."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, dropout=dropout, bias=bias, attention=attention))


def nanogpt(n=1024, n_layer=4, attention="matmul"):
    """The `nanogpt` built-in: 4 heads of d = 16, in eval mode, and one sequence of n random tokens."""
    model = build(n_layer=n_layer, n_embd=64, n_head=4, block_size=max(n, 64), bias=True, attention=attention)
    return model.eval(), (torch.randint(0, 256, (1, n)),)


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
