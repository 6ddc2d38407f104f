"""Train a small GPT with the rewritten attention: the polynomial is the model.

lrcompile's main workflow (README, "Policies"): the network learns under the polynomial kernel,
and every step costs O(n) in the sequence length, forward and backward. The model is
lrcompile.models.GPT (nanoGPT's architecture); --attention picks how its attention is written,
nanoGPT's explicit matmul + masked_fill + softmax or F.scaled_dot_product_attention(is_causal=True):
lrcompile rewrites either. Each step runs the same batch through two copies of one initial model,
one exact (eager), one compiled by lrcompile, and prints both losses.

    python examples/gpt.py                        # 20 steps at n = 64: about half a minute
    python examples/gpt.py --attention sdpa --n 256 --steps 100

The data is a fixed random token stream, a stand-in for a text corpus: the losses show that the two
models train alike, not that either learns language.
"""

from __future__ import annotations

import argparse
import copy

import torch

import lrcompile
from lrcompile.models import ATTENTION, GPT, GPTConfig


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=ATTENTION, default="matmul")
    parser.add_argument("--n", type=int, default=64, help="sequence length (default %(default)s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--degree", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    torch.manual_seed(0)
    config = GPTConfig(block_size=args.n, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       attention=args.attention)
    exact = GPT(config)
    ours = copy.deepcopy(exact)  # the same initial weights
    # on_inaccurate="allow": the polynomial is the model. Every site is rewritten at any length (at
    # these short ones the op computes the polynomial attention directly, as an n x n block), and
    # the model trains under the polynomial kernel at every step; the guard's fallback to exact
    # softmax, or exact attention kept for short lengths, would make it train a different function.
    policy = lrcompile.Policy(degree=args.degree, on_inaccurate="allow")
    compiled = torch.compile(ours, backend=lrcompile.backend(policy))
    lrcompile.reset_stats()  # stats() counts the calls of each rewritten site from here
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3) for model in (exact, ours)]

    stream = torch.randint(0, config.vocab_size, (args.batch, args.n + 1), generator=torch.Generator().manual_seed(0))
    tokens, targets = stream[:, :-1], stream[:, 1:]
    losses = {"exact": [], "lrcompile": []}
    print(f"GPT, {args.n_layer} layers, {args.n_head} heads of d = {args.n_embd // args.n_head}, "
          f"attention={args.attention!r}, n = {args.n}; lrcompile degree {args.degree}")
    print(f"{'step':>5}  {'exact loss':>10}  {'lrcompile loss':>14}  {'difference':>10}")
    for step in range(args.steps):
        for name, model, optimizer in (("exact", exact, optimizers[0]), ("lrcompile", compiled, optimizers[1])):
            _, loss = model(tokens, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
        if step == 0 or step == args.steps - 1 or (step + 1) % 10 == 0:
            exact_loss, our_loss = losses["exact"][-1], losses["lrcompile"][-1]
            print(f"{step + 1:>5}  {exact_loss:>10.4f}  {our_loss:>14.4f}  {abs(our_loss - exact_loss):>10.1e}")
    rewritten = sum(s.calls > 0 for s in lrcompile.stats().values())
    print(f"attention sites running the low-rank op: {rewritten} of {args.n_layer}")
    return {"losses": losses, "sites_rewritten": rewritten}


if __name__ == "__main__":
    main()
