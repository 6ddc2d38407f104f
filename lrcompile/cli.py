"""The `lrcompile` command: explain, check, bench, calibrate (docs/design.md, "The command line").

    lrcompile explain gpt2 [--graph]        the site table (and the graphs)
    lrcompile check nanogpt --degree 4      output and gradient error vs exact float64, degrees 1..4
    lrcompile bench --n 1024 4096 --plot results/bench.png
    lrcompile calibrate [--device cuda]     measure this machine for the cost model (under a minute)

MODEL is a built-in name (nanogpt, gpt2, bert, llama) or path/to/file.py:factory.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch

from lrcompile.compile.backend import compile_graph
from lrcompile.compile.policy import Policy
from lrcompile.compile.report import explain
from lrcompile.models import BUILT_IN, first_tensor, load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lrcompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    explain_parser = commands.add_parser("explain", help="print the attention sites of a model and what happens to each")
    _model_arguments(explain_parser)
    _policy_arguments(explain_parser)
    explain_parser.add_argument("--graph", action="store_true", help="also print the graphs before and after")

    check_parser = commands.add_parser("check", help="error of the rewritten model against exact float64")
    _model_arguments(check_parser)
    check_parser.add_argument("--degree", type=int, default=4, help="check degrees 1..DEGREE (default 4)")
    check_parser.add_argument("--approximation", default="taylor", choices=("taylor", "chebyshev"))
    check_parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"),
                              help="what compiles the rewritten graph: Inductor (what runs in production) or "
                                   "AOTAutograd with eager kernels (the same graphs, no code generation: faster)")

    bench_parser = commands.add_parser("bench", help="time and memory of exact vs low-rank attention over n")
    from lrcompile.bench import command as bench
    bench.add_arguments(bench_parser)

    calibrate_parser = commands.add_parser(
        "calibrate", help="measure where low-rank overtakes exact attention here; the cost model then uses it")
    from lrcompile.bench import calibrate
    calibrate.add_arguments(calibrate_parser)

    args = parser.parse_args(argv)
    if args.command == "explain":
        return _explain(args)
    if args.command == "check":
        return _check(args)
    if args.command == "calibrate":
        calibrate.run(args)
        return 0
    bench.run(args)
    return 0


def _model_arguments(parser):
    parser.add_argument("model", metavar="MODEL", help=f"one of {sorted(BUILT_IN)} or path/to/file.py:factory")
    parser.add_argument("--n", type=int, default=None, help="sequence length for built-in models")


def _policy_arguments(parser):
    parser.add_argument("--degree", default="2", help="polynomial degree, or 'auto' (needs --tolerance)")
    parser.add_argument("--approximation", default="taylor", choices=("taylor", "chebyshev"))
    parser.add_argument("--bound", type=float, default=None)
    parser.add_argument("--tolerance", type=float, default=None)
    parser.add_argument("--min-seq-len", type=int, default=0)
    parser.add_argument("--include", nargs="*", default=())
    parser.add_argument("--exclude", nargs="*", default=())
    parser.add_argument("--no-cost-model", action="store_true", help="rewrite even where exact attention is cheaper")


def _policy(args) -> Policy:
    degree = args.degree if args.degree == "auto" else int(args.degree)
    return Policy(degree=degree, approximation=args.approximation, bound=args.bound, tolerance=args.tolerance,
                  min_seq_len=args.min_seq_len, include=tuple(args.include), exclude=tuple(args.exclude),
                  cost_model=not args.no_cost_model)


def _explain(args) -> int:
    model, inputs = load_model(args.model, args.n)
    report = explain(model, *inputs, policy=_policy(args))
    print(report)
    if args.graph:
        print()
        print(report.graph_code())
    return 0


def _check(args) -> int:
    """Output and gradient error of the rewritten model against the exact model, in float64."""
    model, inputs = load_model(args.model, getattr(args, "n", None))
    exact_model = copy.deepcopy(model).double()
    inputs = tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)
    exact_out, exact_grads = _output_and_gradients(exact_model, inputs)
    inner = None
    if args.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager as inner
    compiler = "Inductor" if inner is None else "AOTAutograd with eager kernels"
    print(f"{args.model}: error of the rewritten model against exact attention, float64, "
          f"relative (Frobenius) | max over entries relative to the largest exact entry.\n"
          f"Each degree compiles the model anew with {compiler} and runs a forward and backward: "
          f"tens of seconds per degree on a CPU{'' if inner else ' (--compiler aot_eager is faster)'}.",
          flush=True)
    print(f"{'degree':>6}  {'output':>22}  {'worst gradient (parameter)':>40}", flush=True)
    for degree in range(1, args.degree + 1):
        print(f"{degree:>6}  compiling and running ...", end="\r", flush=True)
        torch._dynamo.reset()
        candidate = copy.deepcopy(model).double()
        policy = Policy(degree=degree, approximation=args.approximation, cost_model=False, on_inaccurate="allow")
        rewrites = []

        def recording_backend(gm, example_inputs, policy=policy):
            return compile_graph(gm, example_inputs, policy, inner=inner, on_rewrite=rewrites.append)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out, grads = _output_and_gradients(torch.compile(candidate, backend=recording_backend), inputs)
            except Exception as error:  # noqa: BLE001 - report and go on with the next degree
                print(f"{degree:>6}  failed: {type(error).__name__}: {error}", flush=True)
                continue
        decisions = [decision for rewrite in rewrites for _, decision in rewrite.decisions]
        if not any(decision.rewrite for decision in decisions):
            reason = decisions[0].reason if decisions else "no attention site found"
            print(f"{degree:>6}  no site rewritten: {reason}", flush=True)
            continue
        worst_name, worst = max(((name, _relative(grads[name], g)) for name, g in exact_grads.items()),
                                key=lambda item: item[1][0])
        output_error = _relative(out, exact_out)
        print(f"{degree:>6}  {output_error[0]:>10.2e} | {output_error[1]:>9.2e}  "
              f"{worst[0]:>10.2e} | {worst[1]:>9.2e} ({worst_name})", flush=True)
    print("\nper-parameter gradient error at the highest degree:")
    for name, grad in exact_grads.items():
        print(f"  {name:60s} {_relative(grads[name], grad)[0]:.2e}")
    return 0


def _output_and_gradients(model, inputs):
    model.zero_grad()
    out = first_tensor(model(*inputs))
    (out.double() ** 2).mean().backward()
    named = getattr(model, "_orig_mod", model).named_parameters()
    return out.detach().double(), {name: p.grad.detach().clone() for name, p in named if p.grad is not None}


def _relative(a, b):
    difference = (a - b).double()
    return (difference.norm() / b.double().norm().clamp_min(1e-300)).item(), \
        (difference.abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


if __name__ == "__main__":
    sys.exit(main())
