"""Quick start: compile a transformers GPT-2 with lrcompile and see what it did.

Prints the report (each attention site, whether it was rewritten and why), the error of the
compiled model's logits against the exact model, and what the run-time accuracy guard did
(lrcompile.stats()). The model is built from a small GPT2Config with random weights: nothing is
downloaded.

    python examples/quickstart.py                  # n = 64: about 20 s, most of it Inductor compiling
    python examples/quickstart.py --n 512 --n-layer 4
"""

from __future__ import annotations

import argparse

import torch
import transformers

import lrcompile


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="sequence length (default %(default)s)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64, help="4 heads of n_embd / 4 (default %(default)s)")
    return parser.parse_args(argv)


def small_gpt2(n: int, n_layer: int, n_embd: int, batch: int):
    """A GPT-2 language model with random weights, and a batch of random token ids (batch, n)."""
    config = transformers.GPT2Config(n_layer=n_layer, n_head=4, n_embd=n_embd, n_positions=n, vocab_size=256,
                                     bos_token_id=0, eos_token_id=0,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return model, torch.randint(0, config.vocab_size, (batch, n))


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    model, tokens = small_gpt2(args.n, args.n_layer, args.n_embd, args.batch)

    # torch.compile(model, backend="lrcompile") runs the default policy, whose cost model keeps
    # exact attention wherever this machine's calibration measured exact faster (below n of a few
    # thousand on a CPU), and everywhere on a machine not yet calibrated (`lrcompile calibrate`;
    # README, "The command line"). At this example's length it rewrites nothing, and says why:
    default = lrcompile.explain(model, tokens)
    print(f"default policy, n = {args.n}: {sum(s.rewritten for s in default.sites)} of {len(default.sites)} "
          f"sites rewritten; {default.sites[0].module}: {default.sites[0].reason or 'rewritten'}\n")

    # cost_model=False rewrites every site that can be rewritten, whatever n, so that a short
    # example shows a rewrite; the guard (max_error=0.01, on_inaccurate="exact") stays on.
    policy = lrcompile.Policy(cost_model=False)
    report = lrcompile.explain(model, tokens, policy=policy)
    print(report)

    compiled = torch.compile(model, backend=lrcompile.backend(policy))
    lrcompile.reset_stats()
    with torch.no_grad():
        exact = model(tokens).logits
        logits = compiled(tokens).logits
    error = ((logits - exact).abs().max() / exact.abs().max()).item()
    print(f"\nlogits (batch {args.batch}, n = {args.n}): max |lrcompile - exact| / max |exact| = {error:.1e}")

    stats = lrcompile.stats()
    print("accuracy guard, per rewritten site (lrcompile.stats()):")
    for label, site in stats.items():
        print(f"  {label}: {site.calls} call(s), {site.fallbacks} sent to exact attention, "
              f"largest estimated error {site.largest_error:.1e} (max_error {policy.max_error:g})")
    return {"default": default, "report": report, "error": error, "stats": stats}


if __name__ == "__main__":
    main()
