"""lrcompile.kernels.selector: which implementation runs a call, LRCOMPILE_KERNELS, and every implementation
held to the float64 reference.

Inputs are fresh random tensors with scores within |x| <= 2 (lrcompile.reference); the reference is
the quadratic float64 polynomial attention, so in float64 every implementation must agree with it
to rounding (1e-10). Triton runs in a fresh process under TRITON_INTERPRET=1 (set before triton is
imported, see tests/test_triton_kernels.py), in float32 against the same reference (2e-5).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrcompile
from lrcompile.kernels import cpu, selector
from lrcompile.kernels.interface import KernelConfig
from lrcompile.kernels.selector import KernelUnavailableError
from lrcompile.ops import attention, guard
from lrcompile.models import gpt2
from lrcompile.reference import polynomial_attention, random_attention_inputs

TAYLOR_2 = (1.0, 1.0, 0.5)
needs_c = pytest.mark.skipif(not cpu.enabled() or cpu.library() is None, reason="C kernels unavailable")


@pytest.fixture(autouse=True)
def _no_forced_kernels(monkeypatch):
    monkeypatch.delenv(selector.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---- selection ----------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_calls_run_the_c_kernels(dtype):
    assert selector.select("cpu", dtype, 2, 8, 8) == "c"


def test_cpu_calls_run_the_torch_sweep_without_the_c_kernels(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_NATIVE", "0")
    assert selector.select("cpu", torch.float32, 2, 8, 8) == "torch"


def test_cuda_calls_run_triton_where_its_kernels_apply_else_the_torch_sweep():
    pytest.importorskip("triton")
    assert selector.select("cuda", torch.float32, 2, 64, 64) == "triton"
    assert selector.select("cuda", torch.float64, 2, 64, 64) == "torch"  # Triton accumulates in float32
    assert selector.select("cuda", torch.float32, 3, 64, 64) == "torch"  # degree 3 not written in Triton
    assert selector.select("cuda", torch.float32, 2, 256, 64) == "torch"


def test_other_devices_run_the_torch_sweep():
    assert selector.select("meta", torch.float32, 2, 8, 8) == "torch"


@needs_c
def test_the_c_sweep_runs_where_heads_fill_the_threads():
    assert selector.sweep("c", heads=4, dtype=torch.float64, threads=2) == "c"
    assert selector.sweep("c", heads=3, dtype=torch.float64, threads=2) == "torch"  # a core idle a third of the time
    assert selector.sweep("c", heads=1, dtype=torch.float64, threads=2) == "torch"  # multi-threaded torch products
    assert selector.sweep("c", heads=1, dtype=torch.float64, threads=1) == "c"
    assert selector.sweep("torch", heads=4, dtype=torch.float64, threads=2) == "torch"


@needs_c
def test_choice_names_the_slower_cpu_path():
    torch.set_num_threads(2)
    assert selector.choose("cpu", torch.float32, 2, 8, 8, heads=1).label == "c features, torch sweep"
    assert selector.choose("cpu", torch.float32, 2, 8, 8, heads=4).label == "c"


def test_a_choice_says_why_a_device_does_not_run_its_own_kernels(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_NATIVE", "0")
    choice = selector.choose("cpu", torch.float32, 2, 8, 8, heads=4)
    assert (choice.implementation, choice.label) == ("torch", "torch")
    assert choice.reason.startswith("the C kernels are unavailable (torch operations (LRCOMPILE_NATIVE=0)")
    monkeypatch.setenv("LRCOMPILE_KERNELS", "torch")
    assert selector.choose("cpu", torch.float32, 2, 8, 8, heads=4).reason == "LRCOMPILE_KERNELS=torch"


# ---- LRCOMPILE_KERNELS --------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("TORCH ", "torch"), ("", None)])
def test_the_variable_forces_an_implementation(monkeypatch, value, expected):
    monkeypatch.setenv("LRCOMPILE_KERNELS", value)
    assert selector.forced() == expected
    if expected:
        assert selector.select("cpu", torch.float32, 2, 8, 8) == expected


@needs_c
def test_the_variable_is_read_at_every_selection(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_KERNELS", "torch")
    assert selector.select("cpu", torch.float64, 2, 8, 8) == "torch"
    monkeypatch.setenv("LRCOMPILE_KERNELS", "c")
    assert selector.select("cpu", torch.float64, 2, 8, 8) == "c"


def test_an_invalid_value_names_the_variable_and_the_accepted_ones(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_KERNELS", "cuda")
    accepted = r"LRCOMPILE_KERNELS='cuda' is not an implementation; accepted: c, triton, torch"
    with pytest.raises(ValueError, match=accepted):
        selector.select("cpu", torch.float32, 2, 8, 8)
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="LRCOMPILE_KERNELS"):
        lrcompile.lowrank_attention(q, q, q)


@pytest.mark.parametrize("value, device, dtype, degree, message", [
    ("c", "cuda", torch.float32, 2, "the C kernels run CPU tensors, this call's are on cuda"),
    ("c", "cpu", torch.float16, 2, "float32 or float64"),
    ("triton", "cpu", torch.float32, 2, "CPU tensors only under TRITON_INTERPRET=1"),
    ("triton", "cuda", torch.float32, 4, "degree <= 3"),
])
def test_an_implementation_that_cannot_run_the_call_is_an_error_naming_the_variable(
        monkeypatch, value, device, dtype, degree, message):
    if value == "triton" and device == "cuda":
        pytest.importorskip("triton")
    monkeypatch.setenv("LRCOMPILE_KERNELS", value)
    with pytest.raises(KernelUnavailableError, match=f"LRCOMPILE_KERNELS={value} cannot run this call: .*{message}"):
        selector.select(device, dtype, degree, 8, 8)


def test_forcing_c_without_the_library_says_why(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_NATIVE", "0")
    monkeypatch.setenv("LRCOMPILE_KERNELS", "c")
    why = r"LRCOMPILE_KERNELS=c .*unavailable \(torch operations \(LRCOMPILE_NATIVE=0\)"
    with pytest.raises(KernelUnavailableError, match=why):
        lrcompile.lowrank_attention(*(torch.randn(1, 1, 4, 2) for _ in range(3)))


# ---- every implementation against the float64 reference ----------------------------------------


@pytest.fixture
def implementation_spy(monkeypatch):
    """The implementation argument of every factored_attention call lowrank_attention makes."""
    seen = []
    original = attention.factored_attention

    def spy(*args, **kwargs):
        seen.append(args[11])  # implementation: after q, k, v, key_weight, the polynomial and the guard's settings
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "factored_attention", spy)
    return seen


@pytest.mark.parametrize("implementation", [pytest.param("c", marks=needs_c), "torch"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("heads", [1, 4])  # 4 heads on 2 threads: the C sweep; 1: C features, torch sweep
def test_each_implementation_matches_the_float64_reference(monkeypatch, implementation_spy, implementation,
                                                           is_causal, heads):
    monkeypatch.setenv("LRCOMPILE_KERNELS", implementation)
    q, k, v = random_attention_inputs(1, heads, 37, 37, 6, 5, score_range=2.0, seed=heads + 2 * is_causal)
    mask = torch.rand(1, 1, 1, 37) > 0.2
    mask[..., 0] = True
    out = lrcompile.lowrank_attention(q, k, v, attn_mask=mask, is_causal=is_causal, chunk_size=16)
    reference = polynomial_attention(q, k, v, TAYLOR_2, attn_mask=mask, is_causal=is_causal)
    assert implementation_spy == [implementation]
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(reference)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(reference, (q, k, v), grad_out)
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")


def test_a_given_config_runs_as_built_and_excludes_the_keywords_it_replaces(implementation_spy):
    q, k, v = random_attention_inputs(1, 2, 20, 20, 4, 4, score_range=2.0, seed=5)
    config = KernelConfig("torch", TAYLOR_2, 8)
    out = lrcompile.lowrank_attention(q, k, v, is_causal=True, config=config)
    assert implementation_spy == ["torch"]
    torch.testing.assert_close(out, lrcompile.lowrank_attention(q, k, v, is_causal=True, chunk_size=8))
    with pytest.raises(TypeError, match="chunk_size=4"):
        lrcompile.lowrank_attention(q, k, v, chunk_size=4, config=config)
    with pytest.raises(KernelUnavailableError, match="'c' kernels cannot run this call: .* on meta"):
        lrcompile.lowrank_attention(*(t.to("meta") for t in (q, k, v)), config=config._replace(implementation="c"))


# ---- the guard around the Triton op -------------------------------------------------------------


@pytest.mark.parametrize("fall_back", [False, True])
def test_the_guard_op_returns_exact_attention_and_its_gradient_only_where_it_falls_back(fall_back):
    q, k, v = random_attention_inputs(1, 2, 9, 9, 4, 4, score_range=2.0, seed=3)
    q5 = q.unflatten(1, (2, 1)).detach().requires_grad_()
    approximate = torch.randn(1, 2, 1, 9, 4, dtype=torch.float64, requires_grad=True)
    out, exact = guard.guarded_output(approximate, q5, k, v, None, 0.5, True, -0.0 if fall_back else 1e9, "exact",
                                      "test:guard")
    assert bool(exact) is fall_back
    expected = guard.exact_attention(q5, k, v, None, 0.5, True) if fall_back else approximate
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (approximate, q5, k, v), grad_out)
    wanted = torch.autograd.grad(expected, (approximate, q5, k, v), grad_out, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, wanted):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("weights", [False, True])
def test_the_guard_ops_pass_torch_library_opcheck(weights):
    q, k, v = random_attention_inputs(1, 2, 9, 9, 4, 4, score_range=2.0, seed=4)
    q5 = q.detach().unflatten(1, (2, 1)).requires_grad_()
    key_weight = torch.rand(1, 2, 9, dtype=torch.float64, requires_grad=True) if weights else None
    out = torch.randn(1, 2, 1, 9, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(guard.guarded_output, (out, q5, k, v, key_weight, 0.5, False, 0.0, "exact", "test:opcheck"))


# Run in a fresh process with TRITON_INTERPRET=1 and LRCOMPILE_KERNELS=triton: eager lowrank_attention on
# CPU tensors must run the Triton kernels (the interpreter) and agree with the float64 reference, forward
# and gradients; where the guard falls back, with exact attention. Prints "ok" last when all passed.
TRITON_FORCED = """
import torch

import lrcompile
from lrcompile.kernels import triton as triton_kernels
from lrcompile.reference import exact_attention, polynomial_attention, random_attention_inputs

calls = []
forward = triton_kernels.forward


def counting_forward(*args, **kwargs):
    calls.append(args[6])  # causal
    return forward(*args, **kwargs)


triton_kernels.forward = counting_forward  # the op's body looks the launcher up at call time

for causal in (False, True):
    q, k, v = random_attention_inputs(1, 2, 12, 12, 4, 4, score_range=2.0, dtype=torch.float32, seed=int(causal))
    out = lrcompile.lowrank_attention(q, k, v, is_causal=causal, chunk_size=8)
    reference = polynomial_attention(q, k, v, (1.0, 1.0, 0.5), is_causal=causal)
    torch.testing.assert_close(out.double(), reference, rtol=2e-5, atol=2e-5)
    grad_out = torch.randn_like(reference)
    got = torch.autograd.grad(out, (q, k, v), grad_out.float())
    expected = torch.autograd.grad(reference, (q, k, v), grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)

    # max_error 0: the guard falls back, and the call is exact attention, gradients included
    out = lrcompile.lowrank_attention(q, k, v, is_causal=causal, chunk_size=8, max_error=0.0, on_inaccurate="exact")
    exact = exact_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out.double(), exact, rtol=2e-5, atol=2e-5)
    got = torch.autograd.grad(out, (q, k, v), grad_out.float())
    expected = torch.autograd.grad(exact, (q, k, v), grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)

assert calls == [False, False, True, True], calls
print("ok")
"""


def test_triton_forced_under_the_interpreter_runs_the_triton_kernels_on_cpu_tensors():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", TRITON_FORCED], cwd=Path(__file__).resolve().parents[1],
                            env=dict(os.environ, TRITON_INTERPRET="1", LRCOMPILE_KERNELS="triton"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "ok", result.stdout[-4000:]


# ---- the policy and the report ask the same module ----------------------------------------------


@needs_c
@pytest.mark.usefixtures("fresh_dynamo")
def test_the_report_names_the_implementation_each_rewritten_site_runs(monkeypatch):
    model, inputs = gpt2(n=32)  # batch 2 x 4 heads on 2 threads: the C sweep
    report = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(cost_model=False))
    assert [site.implementation for site in report.sites] == ["c", "c"]
    lines = str(report).splitlines()
    assert "implementation" in lines[1] and all(" c " in line for line in lines[3:5])
    torch._dynamo.reset()
    monkeypatch.setenv("LRCOMPILE_KERNELS", "torch")
    report = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(cost_model=False))
    assert [site.implementation for site in report.sites] == ["torch", "torch"]
    kept = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(exclude=("*",)))
    assert [site.implementation for site in kept.sites] == ["", ""]


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_site_the_forced_implementation_cannot_run_is_kept_with_the_reason(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_KERNELS", "triton")  # CPU tensors, no TRITON_INTERPRET
    model, inputs = gpt2(n=32)
    report = lrcompile.explain(model, *inputs, policy=lrcompile.Policy(cost_model=False))
    assert not any(site.rewritten for site in report.sites)
    assert all("LRCOMPILE_KERNELS=triton cannot run this call" in site.reason for site in report.sites)


def test_the_cost_model_keeps_cpu_sites_that_would_run_the_torch_sweep(monkeypatch):
    from types import SimpleNamespace

    from lrcompile.compile.policy import Policy, decide

    monkeypatch.setenv("LRCOMPILE_KERNELS", "torch")
    site = SimpleNamespace(name="softmax", module_path="h.0", supported=True, reason="", replacement=None,
                           is_causal=False, query_shape=(2, 4, 8192, 64), key_shape=(2, 4, 8192, 64),
                           value_shape=(2, 4, 8192, 64), device="cpu", masked_rows="visible")
    decision = decide(site, Policy())
    assert not decision.rewrite and "not calibrated for this machine and kernel path (torch (LRCOMPILE_KERNELS=torch))" \
        in decision.reason


def _site(device, n=4096, d=64):
    from types import SimpleNamespace

    return SimpleNamespace(name="softmax", module_path="h.0", supported=True, reason="", replacement=None,
                           is_causal=True, query_shape=(2, 4, n, d), key_shape=(2, 4, n, d), value_shape=(2, 4, n, d),
                           device=device, masked_rows="visible")


@needs_c
def test_the_policy_picks_the_kernels_by_the_sites_device():
    from lrcompile.compile.policy import Policy, decide

    cpu = decide(_site("cpu"), Policy(cost_model=False, causal_chunk=64))
    assert cpu.config == KernelConfig("c", TAYLOR_2, 64, 0.01, "exact", "h.0:softmax")
    assert cpu.lowrank_kwargs == dict(config=cpu.config, memory_budget=None)
    pytest.importorskip("triton")
    cuda = decide(_site("cuda"), Policy(cost_model=False))
    assert cuda.config.implementation == "triton" and cuda.kernel.label == "triton"
    cuda_degree_4 = decide(_site("cuda", d=8), Policy(degree=4, cost_model=False))
    assert cuda_degree_4.kernel.implementation == "torch" and "degree <= 3" in cuda_degree_4.kernel.reason


@needs_c
@pytest.mark.usefixtures("fresh_dynamo")
def test_a_rewritten_cpu_site_runs_the_c_op_with_the_policys_config():
    from lrcompile.compile.backend import rewrite_graph

    model, inputs = gpt2(n=32)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(rewrite_graph(gm, example_inputs, lrcompile.Policy(cost_model=False)))
        return graphs[-1].graph_module.forward

    torch.compile(model, backend=recording)(*inputs)
    code = graphs[0].code_after
    assert code.count("KernelConfig(") == 2 and "('c', (1.0, 1.0, 0.5)" in code
