"""The graphs lrcompile sees and produces, for a small GPT.

Four graphs per compiled region, as `lrcompile.explain(...).graphs` records them:

    dynamo_before   the FX graph Dynamo hands the backend (attention as the model wrote it)
    dynamo_after    the same graph with each rewritten site replaced by lrcompile.lowrank_attention
    aot_forward     what Inductor compiles for the forward: the factored op, no n x n softmax
    aot_backward    what Inductor compiles for the backward: the factored backward op

    python examples/inspect_graphs.py                        # nanoGPT's matmul + softmax spelling
    python examples/inspect_graphs.py --attention sdpa       # F.scaled_dot_product_attention
    python examples/inspect_graphs.py --graph dynamo_after   # one graph only

`lrcompile explain nanogpt --graph --no-cost-model` prints the same from the command line.
"""

from __future__ import annotations

import argparse

import torch

import lrcompile
from lrcompile.models import ATTENTION, GPT, GPTConfig

GRAPHS = ("dynamo_before", "dynamo_after", "aot_forward", "aot_backward")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=ATTENTION, default="matmul")
    parser.add_argument("--n", type=int, default=32, help="sequence length (default %(default)s)")
    parser.add_argument("--n-layer", type=int, default=1)
    parser.add_argument("--graph", choices=GRAPHS, action="append",
                        help="print only this graph (repeatable); default: all four")
    return parser.parse_args(argv)


def main(argv=None) -> lrcompile.Report:
    args = parse_arguments(argv)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.n, n_layer=args.n_layer, n_embd=64, attention=args.attention))
    tokens = torch.randint(0, model.config.vocab_size, (1, args.n))
    # Training mode: AOTAutograd then partitions a joint forward + backward graph, so the backward
    # Inductor would compile is recorded too (in eval mode only a forward graph exists).
    # cost_model=False: at n = 32 the cost model would keep exact attention, and the graphs would
    # show no rewrite.
    report = lrcompile.explain(model.train(), tokens, policy=lrcompile.Policy(cost_model=False))
    print(report)
    print()
    if args.graph is None:
        print(report.graph_code())
    else:
        for key in args.graph:
            for index, code in enumerate(report.graphs[key]):
                print(f"# ==== {key}, graph {index} ====\n{code.strip()}\n")
    return report


if __name__ == "__main__":
    main()
