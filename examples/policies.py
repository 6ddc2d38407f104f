"""What each Policy field decides, on a small transformers GPT-2 (random weights, nothing downloaded).

One line per policy, from lrcompile.explain's report and lrcompile.stats():

    include / exclude     fnmatch patterns on module paths as model.named_modules() names them
    min_seq_len           keep exact attention for shorter key lengths (decided per shape)
    degree="auto"         the smallest degree meeting `tolerance` on the score range, measured or `bound`
    max_error, on_inaccurate
                          what a call whose estimated error is above max_error does: "exact" returns
                          exact attention, "allow" checks nothing (the polynomial is the model)

    python examples/policies.py              # n = 64: about half a minute, most of it compiling
    python examples/policies.py --n 256
"""

from __future__ import annotations

import argparse

import torch
import transformers

import lrcompile

# Every policy here sets cost_model=False: at a few dozen tokens exact attention is cheaper, and
# the cost model would keep every site exact whatever the other fields say.
FORCE = dict(cost_model=False)


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="sequence length (default %(default)s)")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--q-scale", type=float, default=40.0,
                        help="factor on the query projection in the guard section, to widen the scores "
                             "(default %(default)s)")
    return parser.parse_args(argv)


def small_gpt2(n: int, n_layer: int):
    """A GPT-2 language model with 4 heads of d = 16 and random weights, and random tokens (2, n)."""
    config = transformers.GPT2Config(n_layer=n_layer, n_head=4, n_embd=64, n_positions=n, vocab_size=256,
                                     bos_token_id=0, eos_token_id=0,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, config.vocab_size, (2, n))


def decisions(report: lrcompile.Report) -> str:
    """The report in one line: which sites were rewritten (at which degree), which kept, and why."""
    outcomes: dict[str, list[str]] = {}
    for site in report.sites:
        outcome = f"rewritten, degree {site.degree}" if site.rewritten else f"kept exact ({site.reason})"
        outcomes.setdefault(outcome, []).append(site.module)
    return "; ".join(f"{', '.join(modules)} {outcome}" for outcome, modules in outcomes.items())


def score_ranges(report: lrcompile.Report) -> str:
    ranges = [site.score_range for site in report.sites if site.score_range is not None]
    if not ranges:
        return "score range not measured"
    return f"score range {min(ranges):.2g}" + (f" to {max(ranges):.2g}" if max(ranges) > min(ranges) else "")


def include_exclude(model, tokens) -> dict[str, lrcompile.Report]:
    print("== include / exclude: patterns on module paths")
    reports = {}
    for label, policy in [("include='transformer.h.0.attn'", lrcompile.Policy(include="transformer.h.0.attn", **FORCE)),
                          ("exclude='*.h.0.*'", lrcompile.Policy(exclude="*.h.0.*", **FORCE)),
                          ("include='h.*.attn'", lrcompile.Policy(include="h.*.attn", **FORCE))]:
        report = reports[label] = lrcompile.explain(model, tokens, policy=policy)
        print(f"  {label}: {decisions(report)}")
        # A pattern written for another model's paths selects nothing; the report says so, not silently.
        for pattern in report.unmatched_patterns:
            print(f"    pattern {pattern!r} matches no module path of this model")
    return reports


def min_seq_len(model, tokens) -> dict[int, lrcompile.Report]:
    print("== min_seq_len: exact attention below a key length")
    threshold = tokens.shape[1]
    policy = lrcompile.Policy(min_seq_len=threshold, **FORCE)
    reports = {}
    for n in (threshold // 2, threshold):
        reports[n] = lrcompile.explain(model, tokens[:, :n], policy=policy)
        print(f"  min_seq_len={threshold}, n = {n}: {decisions(reports[n])}")
    return reports


def auto_degree(model, tokens) -> dict[str, lrcompile.Report]:
    print("== degree='auto': the smallest degree meeting the tolerance on the score range")
    reports = {}
    for label, policy in [
        # bound=None: the range is measured on the inputs the model is compiled with
        ("tolerance=1e-2", lrcompile.Policy(degree="auto", tolerance=1e-2, **FORCE)),
        ("tolerance=1e-4", lrcompile.Policy(degree="auto", tolerance=1e-4, **FORCE)),
        # a bound fixes the range the polynomial must cover, whatever the inputs
        ("tolerance=1e-3, bound=1.0", lrcompile.Policy(degree="auto", tolerance=1e-3, bound=1.0, **FORCE)),
        # no polynomial of degree <= 16 reaches 1e-3 on [-4, 4]: kept exact, with that reason
        ("tolerance=1e-3, bound=4.0", lrcompile.Policy(degree="auto", tolerance=1e-3, bound=4.0, **FORCE)),
    ]:
        reports[label] = lrcompile.explain(model, tokens, policy=policy)
        measured = "" if policy.bound is not None else f" ({score_ranges(reports[label])})"
        print(f"  {label}{measured}: {decisions(reports[label])}")
    return reports


def guard(model, tokens, q_scale: float) -> dict[str, dict]:
    print("== max_error and on_inaccurate: the run-time accuracy guard")
    # Random weights give scores below about 0.2, where degree 2 is accurate and the guard has
    # nothing to catch. Trained models reach 8 to 67 (docs/design.md, section 3); a wider query
    # projection stands in for them here.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :model.config.n_embd] *= q_scale  # GPT-2's Conv1D: (in, q | k | v)
        exact = model(tokens).logits
    results = {}
    for on_inaccurate in ("exact", "allow"):
        policy = lrcompile.Policy(max_error=0.01, on_inaccurate=on_inaccurate, **FORCE)
        compiled = torch.compile(model, backend=lrcompile.backend(policy))
        lrcompile.reset_stats()
        with torch.no_grad():
            logits = compiled(tokens).logits
        error = ((logits - exact).abs().max() / exact.abs().max()).item()
        stats = lrcompile.stats()
        calls, fallbacks = sum(s.calls for s in stats.values()), sum(s.fallbacks for s in stats.values())
        largest = max((s.largest_error for s in stats.values()), default=0.0)
        estimate = f"largest estimated error {largest:.2g}" if on_inaccurate != "allow" else "nothing checked"
        print(f"  max_error=0.01, on_inaccurate={on_inaccurate!r}: {fallbacks} of {calls} calls sent to exact "
              f"attention ({estimate}); logits vs exact: {error:.1e}")
        results[on_inaccurate] = {"stats": stats, "error": error}
    return results


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    model, tokens = small_gpt2(args.n, args.n_layer)
    results = {"include_exclude": include_exclude(model, tokens)}
    # Each explain compiles the model again, and Dynamo allows only 8 compiled versions of a
    # function before it falls back to eager; a fresh start per section keeps them apart.
    torch._dynamo.reset()
    results["min_seq_len"] = min_seq_len(model, tokens)
    torch._dynamo.reset()
    results["auto_degree"] = auto_degree(model, tokens)
    torch._dynamo.reset()
    results["guard"] = guard(model, tokens, args.q_scale)
    return results


if __name__ == "__main__":
    main()
