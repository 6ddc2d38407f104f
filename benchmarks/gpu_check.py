"""The GPU path in one prepared run of at most 6 minutes: run it first whenever a GPU is lent.

    python benchmarks/gpu_check.py                  # every step; logs and gpu_check.json in one folder
    python benchmarks/gpu_check.py --out DIR        # that folder (default: $OUT when set, else
                                                    # benchmarks/results/gpu_check-<UTC time>)
    python benchmarks/gpu_check.py --device cpu     # the same steps at tiny sizes on the CPU (what
                                                    # tests/test_benchmark_scripts.py runs)

Every step logs to its own file and adds its results to gpu_check.json, which is rewritten after
each step, so nothing is lost to a truncated console or a run cut short. A failing step never
stops the next; a step that would start after --budget-s seconds is recorded as skipped.

1. tests: the CUDA tests (`pytest -m gpu`) of tests/test_triton_kernels.py and tests/test_op_layouts.py:
   the registered ops against float64 (float32 and bfloat16, degree 2 at d = 64 and degree 3 at
   d = 32, causal and not, GQA, key padding), opcheck, torch.compile of the op, and a compiled
   model whose Inductor output code holds our kernels beside Inductor's own. CUDA only.
2. models: a transformers Llama with GQA (16 heads, 4 KV heads, d = 64) and a GPT-2 (16 heads,
   d = 64), 2 layers each, built from configs (random weights), bfloat16 (and the Llama also with
   float32 weights under bfloat16 autocast), one training step
   compiled by lrcompile (every eligible site rewritten, on_inaccurate="allow") and by Inductor
   alone: loss and gradients against the exact step, lrcompile.stats() per site (calls, compile
   failures), whether Inductor's output code holds our kernels, and the step times.
3. autotune: forward + backward ms of our kernels per (d, degree, causal) at n = 16384, H = 16,
   over the small space lrcompile.kernels.triton_tuning.SPACE of (row tile, causal chunk); the best of
   each is recorded in triton_tuning.json in the output folder (copy it to lrcompile/kernels/, or point
   LRCOMPILE_TRITON_TUNING at it, and the kernels use it on that GPU).
4. timings: forward + backward of our kernels (the launchers the op calls) against SDPA's flash
   backend, bfloat16, B = 1, H = 16 and 8, n = 16384 and 65536, d = 64 degree 2 and d = 32
   degree 3, causal and not; speed-up = flash ms / ours ms, each row with issue P9's target for
   it and whether this run meets it (`target`).

Times on CUDA are triton.testing.do_bench medians (CUDA events); on the CPU, medians of a few
perf_counter runs of the CPU op (lrcompile::factored_attention) and SDPA's math kernel, which only
shows that the step runs. Exits 1 if a step failed, 2 without CUDA (unless --device cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))

from lrcompile.kernels import triton_tuning  # noqa: E402 - after the path: runs from a checkout

TAYLOR = {2: [1.0, 1.0, 0.5], 3: [1.0, 1.0, 0.5, 1 / 6]}
STEPS = ("tests", "models", "autotune", "timings")
# Per device: the sizes of each step. The CPU ones only exercise the code paths.
SIZES = {
    "cuda": dict(model_n=8192, model_heads=16, model_kv_heads=4, model_width=1024, dtype=torch.bfloat16,
                 lengths=(16384, 65536), heads=(16, 8), autotune_n=16384, autotune_heads=16,
                 configurations=((64, 2), (32, 3))),
    "cpu": dict(model_n=64, model_heads=4, model_kv_heads=2, model_width=64, dtype=torch.float32,
                lengths=(64,), heads=(2,), autotune_n=64, autotune_heads=2, configurations=((16, 2), (8, 3))),
}
AUTOTUNE_SPACE = triton_tuning.SPACE  # (row tile, causal chunk) of our kernels


class Run:
    """The output folder, the JSON written after every step, and the clock of the budget."""

    def __init__(self, out: Path, device: str, budget_s: float):
        self.out, self.device, self.budget_s, self.started = out, device, budget_s, time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        self.result = {"device": _device_name(device), "torch": torch.__version__, "triton": _triton_version(),
                       "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "budget_s": budget_s, "steps": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, name: str, function) -> bool:
        """Run one step with its log; record its results, or its failure, or that it was skipped."""
        if self.elapsed() > self.budget_s:
            spent = f"{self.elapsed():.0f} s spent of the {self.budget_s:.0f} s budget"
            self.result["steps"][name] = {"status": f"skipped: {spent}"}
            self.save()
            return True
        log_path = self.out / f"{name}.log"
        started = time.monotonic()
        print(f"\n== {name} (log: {log_path}) ==", flush=True)
        with open(log_path, "w") as log, _tee(log):
            try:
                record = function(self, log_path)
                record.setdefault("status", "passed")
            except Exception as error:  # noqa: BLE001 - one step's failure must not cost the others
                traceback.print_exc()
                record = {"status": f"failed: {type(error).__name__}: {error}"}
        record["seconds"] = round(time.monotonic() - started, 1)
        self.result["steps"][name] = record
        self.save()
        print(f"== {name}: {record['status']} ({record['seconds']} s)", flush=True)
        return record["status"] in ("passed", "skipped") or record["status"].startswith("skipped")

    def save(self):
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _tee(log):
    """print() goes to the console and to the step's log."""
    class Tee:
        def __init__(self, stream):
            self.stream = stream

        def write(self, text):
            log.write(text)
            return self.stream.write(text)

        def flush(self):
            log.flush()
            self.stream.flush()

    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(stdout), Tee(stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


# ---- 1. tests -------------------------------------------------------------------------------------


def run_tests(run: Run, log_path: Path) -> dict:
    if run.device != "cuda":
        return {"status": "skipped: the CUDA tests need CUDA"}
    command = [sys.executable, "-m", "pytest", "tests/test_triton_kernels.py", "tests/test_op_layouts.py", "-q",
               "-p", "no:cacheprovider", "-m", "gpu", "-rs"]
    print("$", " ".join(command[1:]), flush=True)
    completed = subprocess.run(command, cwd=ROOT, timeout=150, capture_output=True, text=True)
    print(completed.stdout[-20000:] + completed.stderr[-5000:], flush=True)
    summary = (completed.stdout.strip().splitlines() or [""])[-1]
    return {"status": "passed" if completed.returncode == 0 else f"failed: {summary}", "summary": summary}


# ---- 2. models ------------------------------------------------------------------------------------


def build_model(name: str, sizes: dict):
    """A 2-layer transformers model from a config (random weights), and token ids (1, n)."""
    import transformers

    n, heads, width = sizes["model_n"], sizes["model_heads"], sizes["model_width"]
    torch.manual_seed(0)
    if name == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=heads,
                                          num_key_value_heads=sizes["model_kv_heads"], hidden_size=width,
                                          intermediate_size=2 * width, vocab_size=512, max_position_embeddings=n)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(n_layer=2, n_head=heads, n_embd=width, vocab_size=512, n_positions=n,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    model.config._attn_implementation = "sdpa"
    return model.train(), torch.randint(0, 512, (1, n))


def _compilers(device: str):
    """(ours, exact) torch.compile backends: lrcompile rewriting every eligible site, and Inductor
    alone. On the CPU, AOTAutograd with eager kernels stands in for Inductor (same graphs, no
    minutes of CPU compile)."""
    import lrcompile
    from lrcompile.compile.backend import compile_graph

    policy = lrcompile.Policy(cost_model=False, on_inaccurate="allow")
    if device == "cuda":
        return lrcompile.backend(policy), "inductor"
    from torch._dynamo.backends.debugging import aot_eager

    return (lambda gm, example_inputs: compile_graph(gm, example_inputs, policy, inner=aot_eager)), "aot_eager"


# (name, model, precision): bfloat16 weights, and float32 weights under bfloat16 autocast, where
# Llama's rotary embedding hands attention float32 q, k and bfloat16 v (issue P9, section 4)
MODEL_RUNS = (("llama", "llama", "bfloat16"), ("llama-autocast", "llama", "autocast"), ("gpt2", "gpt2", "bfloat16"))
LAYERS = 2  # build_model's: one attention site each


def _training_step(model, ids, autocast=False):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach().float()


def check_models(run: Run, log_path: Path) -> dict:
    import lrcompile

    sizes = SIZES[run.device]
    ours_backend, exact_backend = _compilers(run.device)
    records, failed = {}, []
    for name, family, precision in MODEL_RUNS:
        autocast = precision == "autocast"
        model, ids = build_model(family, sizes)
        model, ids = model.to(run.device, torch.float32 if autocast else sizes["dtype"]), ids.to(run.device)
        exact_model = copy.deepcopy(model)
        torch._dynamo.reset()
        lrcompile.reset_stats()
        compiled = torch.compile(model, backend=ours_backend)
        codes = []
        if run.device == "cuda":
            from torch._inductor.utils import run_and_get_code

            loss, codes = run_and_get_code(_training_step, compiled, ids, autocast)
        else:
            loss = _training_step(compiled, ids, autocast)
        stats = {label: vars(counters) for label, counters in lrcompile.stats().items()}
        exact_loss = _training_step(torch.compile(exact_model, backend=exact_backend), ids, autocast)
        gradient_error = max(_relative(p.grad, e.grad) for p, e in zip(model.parameters(), exact_model.parameters())
                             if p.grad is not None and e.grad is not None)
        from test_triton_kernels import FORWARD_KERNELS, BACKWARD_KERNELS

        ours_in_code = None
        if codes:
            names = set(FORWARD_KERNELS[True] + BACKWARD_KERNELS[True])
            ours_in_code = all(any(kernel in code for code in codes) for kernel in names)
        record = {"n": ids.shape[-1], "precision": "float32 weights, bfloat16 autocast" if autocast else
                  str(sizes["dtype"]), "loss": float(loss),
                  "exact_loss": float(exact_loss), "max_gradient_error_relative_to_largest": gradient_error,
                  "sites": stats, "ours_in_inductor_code": ours_in_code,
                  "step_ms": _step_ms(run.device, compiled, ids, autocast), "exact_step_ms": None}
        record["exact_step_ms"] = _step_ms(run.device, torch.compile(exact_model, backend=exact_backend), ids,
                                           autocast)
        problems = [f"{label}: no call" for label, counters in stats.items() if counters["calls"] == 0]
        if stats and len(stats) != LAYERS:
            problems.append(f"{len(stats)} of {LAYERS} sites rewritten")
        problems += [f"{label}: {counters['compile_error']}" for label, counters in stats.items()
                     if counters["compile_failures"]]
        if not stats:
            problems.append("no rewritten site was called")
        if ours_in_code is False:
            problems.append("Inductor's output code lacks our kernels")
        record["problems"] = problems
        failed += [f"{name}: {problem}" for problem in problems]
        records[name] = record
        print(json.dumps({name: record}, indent=2, default=str), flush=True)
    return {"status": "passed" if not failed else "failed: " + "; ".join(failed)[:500], "models": records}


def _relative(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _step_ms(device, compiled, ids, autocast=False) -> float:
    """Median ms of a training step (the first, compiling one, already ran)."""
    return _time_ms(device, lambda: _training_step(compiled, ids, autocast))


# ---- 3. autotune and 4. timings -------------------------------------------------------------------


def _time_ms(device: str, function) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(function, warmup=5, rep=40))
    function()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def _inputs(device, heads, n, head_dim, dtype):
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (0.3 * torch.randn(1, heads, n, head_dim, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    return q, k, v, torch.randn(q.shape, device=device, dtype=dtype, generator=generator)


def ours_forward_backward(device, q, k, v, grad_out, degree, causal, block=None, chunk=64):
    """Forward + backward of our kernels: the Triton launchers on CUDA, the CPU op elsewhere."""
    args = (TAYLOR[degree], q.shape[-1] ** -0.5, causal, chunk)
    if device == "cuda":
        from lrcompile.kernels import triton as triton_kernels

        def run():
            out, denominator, state = triton_kernels.forward(q.unsqueeze(2), k, v, None, *args, block_size=block)
            triton_kernels.backward(grad_out.unsqueeze(2), q.unsqueeze(2), k, v, None, out, denominator, state,
                                    *args, False, block_size=block)
        return run
    leaves = [t.clone().requires_grad_() for t in (q.unsqueeze(2), k, v)]

    def run():
        out = torch.ops.lrcompile.factored_attention(*leaves, None, *args, 0.0, "allow", "gpu_check")[0]
        torch.autograd.grad(out, leaves, grad_out.unsqueeze(2))
    return run


def flash_forward_backward(device, q, k, v, grad_out, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    backend = SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH

    def run():
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
        torch.autograd.grad(out, leaves, grad_out)
    return run


def autotune(run: Run, log_path: Path) -> dict:
    sizes = SIZES[run.device]
    rows = []
    # every tile pair as asked: no earlier choice may override the one timed
    os.environ[triton_tuning.ENVIRONMENT_VARIABLE] = str(run.out / "no-earlier-tuning.json")
    for head_dim, degree in sizes["configurations"]:
        for causal in (False, True):
            q, k, v, grad_out = _inputs(run.device, sizes["autotune_heads"], sizes["autotune_n"], head_dim,
                                        sizes["dtype"])
            timed = []
            for block, chunk in AUTOTUNE_SPACE:
                ms = _time_ms(run.device, ours_forward_backward(run.device, q, k, v, grad_out, degree, causal, block,
                                                                chunk))
                timed.append({"block": block, "chunk": chunk, "ms": round(ms, 3)})
            best = min(timed, key=lambda row: row["ms"])
            rows.append({"head_dim": head_dim, "degree": degree, "causal": causal, "dtype": str(sizes["dtype"]),
                         "n": sizes["autotune_n"], "heads": sizes["autotune_heads"], "timed": timed, "best": best})
            print(f"d = {head_dim} degree {degree} causal {causal}: " + ", ".join(
                f"{row['block']}/{row['chunk']} {row['ms']:.2f} ms" for row in timed) + f"; best {best}", flush=True)
    del os.environ[triton_tuning.ENVIRONMENT_VARIABLE]
    table = run.out / "triton_tuning.json"
    triton_tuning.record(rows, run.result["device"], table)
    return {"rows": rows, "table": str(table)}


# Issue P9's targets for these timings (bfloat16, B = 1): speed-up over flash at H = 16, d = 64,
# degree 2 (also what op_speed.py --device cuda checks), a time at H = 8, and degree 3 at d = 32
# ahead of flash from n = 16384, causal.
SPEED_UP_TARGETS = {(False, 16384): 4.0, (False, 65536): 20.0, (True, 16384): 1.5, (True, 65536): 8.0}
CAUSAL_H8_65536_MS = 8.0


def target(row: dict) -> dict | None:
    """{"target": what P9 asks of this row, "met": whether this run meets it}, or None where it asks nothing."""
    key = (row["head_dim"], row["degree"], row["causal"], row["heads"], row["n"])
    if key[:2] == (64, 2) and row["heads"] == 16 and (row["causal"], row["n"]) in SPEED_UP_TARGETS:
        wanted = SPEED_UP_TARGETS[row["causal"], row["n"]]
        return {"target": f"speed-up >= {wanted:g}x", "met": row["speed_up"] >= wanted}
    if key == (64, 2, True, 8, 65536):
        return {"target": f"<= {CAUSAL_H8_65536_MS:g} ms", "met": row["ours_ms"] <= CAUSAL_H8_65536_MS}
    if key[:3] == (32, 3, True) and row["n"] >= 16384:
        return {"target": "faster than flash", "met": row["speed_up"] > 1.0}
    return None


def timings(run: Run, log_path: Path) -> dict:
    sizes = SIZES[run.device]
    rows = []
    print(f"{'d':>3} {'deg':>3} {'causal':>6} {'H':>3} {'n':>6} {'ours ms':>9} {'flash ms':>9} {'speed-up':>8}")
    for head_dim, degree in sizes["configurations"]:
        for causal in (False, True):
            for heads in sizes["heads"]:
                for n in sizes["lengths"]:
                    if run.elapsed() > run.budget_s:
                        rows.append({"head_dim": head_dim, "degree": degree, "causal": causal, "heads": heads,
                                     "n": n, "skipped": "out of time"})
                        continue
                    q, k, v, grad_out = _inputs(run.device, heads, n, head_dim, sizes["dtype"])
                    ours_ms = _time_ms(run.device, ours_forward_backward(run.device, q, k, v, grad_out, degree,
                                                                         causal))
                    flash_ms = _time_ms(run.device, flash_forward_backward(run.device, q, k, v, grad_out, causal))
                    row = {"head_dim": head_dim, "degree": degree, "causal": causal, "heads": heads, "n": n,
                           "dtype": str(sizes["dtype"]), "ours_ms": round(ours_ms, 3),
                           "flash_ms": round(flash_ms, 3), "speed_up": round(flash_ms / ours_ms, 3)}
                    row.update(target(row) or {})
                    rows.append(row)
                    verdict = f"  {row['target']}: {'met' if row['met'] else 'NOT met'}" if "target" in row else ""
                    print(f"{head_dim:>3} {degree:>3} {str(causal):>6} {heads:>3} {n:>6} {ours_ms:>9.2f} "
                          f"{flash_ms:>9.2f} {flash_ms / ours_ms:>8.2f}{verdict}", flush=True)
                    del q, k, v, grad_out
    return {"rows": rows}


# ---- main -----------------------------------------------------------------------------------------


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return ROOT / "benchmarks" / "results" / f"gpu_check-{stamp}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="the folder of the logs and gpu_check.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="no step starts after this many seconds (the run stays within 6 minutes)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (--device cpu runs the steps at tiny sizes)", file=sys.stderr)
        return 2
    out = args.out or default_out()
    run = Run(out, args.device, args.budget_s)
    print(f"gpu_check: {run.result['device']}, torch {run.result['torch']}, triton {run.result['triton']}; "
          f"output in {out}", flush=True)
    functions = {"tests": run_tests, "models": check_models, "autotune": autotune, "timings": timings}
    passed = True
    for name in args.steps:
        passed &= run.step(name, functions[name])
    run.result["passed"] = passed
    run.save()
    print(f"\ngpu_check: {'passed' if passed else 'FAILED'} in {run.elapsed():.0f} s; {out / 'gpu_check.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
