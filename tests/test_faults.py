"""Injected failures in each stage of the backend: the model still compiles and runs (docs/design.md section 5:
"a rewrite that fails for any reason falls back to compiling the original graph, with a warning").

Stages: finding the sites (passes.find_attention_sites), replacing one (passes.replace_attention_site),
compiling the rewritten graph (the inner compiler), and the CPU kernels (lrcompile.kernels.cpu: the C
build fails, or library() raises). After every fault: the output is the one the policy promises,
there is exactly one warning however often the model is called, and the user's module is the one
they passed in (same parameters, buffers, state_dict and forward; still right when run eagerly).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import lrcompile
from attention_corpus import NanoGptCausal
from lrcompile.kernels import cpu
from lrcompile.compile.backend import compile_graph
from lrcompile.compile.policy import Policy

FORCE = Policy(cost_model=False)  # rewrite every eligible site
TORCH_COMPILE_MARKS = {"_is_torch_compile"}  # set on the module by torch.compile itself, whatever the backend


class Block(nn.Module):
    """A residual block whose attention lives at module path "attn" (nanoGPT's spelling)."""

    def __init__(self):
        super().__init__()
        self.attn = NanoGptCausal()
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        h = x + self.attn(x)
        return h + self.mlp(h)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Block().double().eval()


@pytest.fixture
def x():
    return torch.randn(2, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def backend(policy, inner=aot_eager, rewrites=None):
    """Our rewrite, then AOTAutograd with eager kernels (the op's explicit backward is traced, as
    on Inductor's path, without Inductor's compile time)."""
    def compiler(gm, example_inputs):
        return compile_graph(gm, example_inputs, policy, inner=inner,
                             on_rewrite=None if rewrites is None else rewrites.append)
    return compiler


def run_three_times(compiled, x):
    """Three forward+backward calls; the last output and the warnings lrcompile gave over all."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x_grad = x.clone().requires_grad_()
            out = compiled(x_grad)
            out.sum().backward()
    return out.detach(), [str(w.message) for w in caught if "lrcompile" in str(w.message)]


def snapshot(module: nn.Module):
    return {
        "state": {name: t.detach().clone() for name, t in module.state_dict().items()},
        "parameters": [id(p) for p in module.parameters()],
        "forward": type(module).forward,
        "instance_attributes": set(vars(module)) - TORCH_COMPILE_MARKS,
        "modules": [(name, type(m)) for name, m in module.named_modules()],
    }


def assert_untouched(module: nn.Module, before: dict, x: torch.Tensor, eager_out: torch.Tensor):
    after = snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), f"{name} changed"
    assert after["parameters"] == before["parameters"]
    assert after["forward"] is before["forward"] and "forward" not in vars(module)
    assert after["instance_attributes"] == before["instance_attributes"]
    assert after["modules"] == before["modules"]
    with torch.no_grad():
        assert torch.equal(module(x), eager_out), "the module no longer computes what it did eagerly"


def eager(model, x):
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------------
# The pass, the rewrite, the inner compiler


def test_a_failing_site_search_compiles_the_original_graph_and_warns_once(model, x, monkeypatch):
    def broken(gm):
        raise RuntimeError("simulated failure in find_attention_sites")

    monkeypatch.setattr("lrcompile.compile.backend.find_attention_sites", broken)
    expected, before = eager(model, x), snapshot(model)
    out, messages = run_three_times(torch.compile(model, backend=backend(FORCE)), x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert len(messages) == 1, messages
    assert "rewriting failed" in messages[0] and "simulated failure in find_attention_sites" in messages[0]
    assert_untouched(model, before, x, expected)


def test_a_failing_site_search_warning_names_the_module_it_was_searching(model, x, monkeypatch):
    def broken(gm):
        raise RuntimeError("simulated failure in find_attention_sites")

    monkeypatch.setattr("lrcompile.compile.backend.find_attention_sites", broken)
    _, messages = run_three_times(torch.compile(model, backend=backend(FORCE)), x)
    assert len(messages) == 1 and "attn" in messages[0], messages


def test_a_failing_replacement_compiles_the_original_graph_and_warns_once_naming_the_site(model, x, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in replace_attention_site")

    monkeypatch.setattr("lrcompile.compile.backend.replace_attention_site", broken)
    expected, before = eager(model, x), snapshot(model)
    out, messages = run_three_times(torch.compile(model, backend=backend(FORCE)), x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert len(messages) == 1, messages
    assert re.search(r"replacing site \w+ \(attn\) failed: simulated failure in replace_attention_site", messages[0])
    assert_untouched(model, before, x, expected)


def test_a_failing_compile_of_the_rewritten_graph_compiles_the_original_and_names_the_site(model, x):
    """The rewritten graph fails in the inner compiler (Inductor lowering, say): the original
    graph is compiled by the same compiler instead."""
    def inner(gm, example_inputs):
        if "lowrank_attention" in gm.code:
            raise RuntimeError("simulated failure lowering lowrank_attention")
        return aot_eager(gm, example_inputs)

    expected, before = eager(model, x), snapshot(model)
    out, messages = run_three_times(torch.compile(model, backend=backend(FORCE, inner=inner)), x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert len(messages) == 1, messages
    assert re.search(r"compiling the rewritten graph failed .*sites \w+ \(attn\) stay exact", messages[0])
    assert "simulated failure lowering lowrank_attention" in messages[0]
    assert_untouched(model, before, x, expected)


def _fails_with_the_rewrite(gm, example_inputs):
    if "lowrank_attention" in gm.code:
        raise RuntimeError("simulated failure compiling lowrank_attention's kernels")
    return aot_eager(gm, example_inputs)


def test_a_failing_compile_of_the_rewritten_graph_is_counted_per_site_in_stats(model, x):
    lrcompile.reset_stats()
    run_three_times(torch.compile(model, backend=backend(FORCE, inner=_fails_with_the_rewrite)), x)
    counters = lrcompile.stats()
    assert [label.split(":")[0] for label in counters] == ["attn"]
    (site,) = counters.values()
    assert site.compile_failures == 1 and site.calls == 0
    assert "RuntimeError: simulated failure compiling lowrank_attention's kernels" in site.compile_error
    lrcompile.reset_stats()
    assert lrcompile.stats() == {}


def test_a_failing_compile_of_the_rewritten_graph_raises_when_inaccurate_sites_must(model, x):
    """Policy(on_inaccurate="error") promises never to run anything but the rewrite silently."""
    compiled = torch.compile(model, backend=backend(Policy(cost_model=False, on_inaccurate="error"),
                                                    inner=_fails_with_the_rewrite))
    with pytest.raises(Exception, match="RewriteCompileError.*compiling the rewritten graph failed") as raised:
        compiled(x)
    chain, error = [], raised.value  # Dynamo wraps what a backend raises
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or getattr(error, "inner_exception", None)
    assert any(isinstance(error, lrcompile.RewriteCompileError) for error in chain), chain
    assert "simulated failure compiling" in str(raised.value)


def test_explain_reports_a_site_whose_rewritten_graph_fails_to_compile_as_kept_with_the_error(model, x, monkeypatch):
    """explain compiles the graphs whose kernels Inductor compiles itself (Triton, on CUDA), as the
    backend would; here the CPU kernels stand in for them and the compile fails."""
    from lrcompile.compile import report

    def failing_compile(gm, example_inputs):
        raise RuntimeError("simulated: Both operands must be same dtype. Got fp64 and fp32")

    monkeypatch.setattr(report, "COMPILE_CHECKED_IMPLEMENTATIONS", ("c", "torch", "triton"))
    monkeypatch.setattr(report, "_inductor_compile", failing_compile)
    lrcompile.reset_stats()
    explained = lrcompile.explain(model, x, policy=FORCE)
    (site,) = explained.sites
    assert not site.rewritten and site.implementation == ""
    assert "compiling the rewritten graph failed" in site.reason and "Got fp64 and fp32" in site.reason
    assert "kept exact" in str(explained) and "Got fp64 and fp32" in str(explained)
    assert lrcompile.stats()[site.label].compile_failures == 1
    lrcompile.reset_stats()


# ---------------------------------------------------------------------------------------------
# The CPU kernels


@pytest.fixture
def kernels_that_fail_to_build(monkeypatch, tmp_path):
    """lrcompile.kernels.cpu as on a machine where the C compiler fails: an empty cache, a build that
    raises, and no library loaded yet in this process. Returns the real native state, to compare."""
    cpu.library()
    real_state = dict(cpu._state)

    def failing_build(compiler, path):
        raise RuntimeError("simulated: cc failed on kernels.c")

    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LRCOMPILE_NATIVE", raising=False)
    monkeypatch.setattr(cpu, "_build", failing_build)
    monkeypatch.setattr(cpu, "_state", {})
    return real_state


def test_a_failed_kernel_build_runs_the_same_polynomial_with_torch_operations_and_warns_once(
        model, x, kernels_that_fail_to_build, monkeypatch):
    expected_eager, before = eager(model, x), snapshot(model)
    out, messages = run_three_times(torch.compile(model, backend=backend(FORCE)), x)
    assert cpu.library() is None and "simulated: cc failed" in cpu.status()
    assert len(messages) == 1 and "native CPU kernels unavailable" in messages[0], messages
    assert "simulated: cc failed" in messages[0]
    assert not torch.equal(out, expected_eager)  # really rewritten: degree 2 is not exact
    assert_untouched(model, before, x, expected_eager)

    if kernels_that_fail_to_build.get("library") is not None:  # the same function on the C path
        monkeypatch.setattr(cpu, "_state", kernels_that_fail_to_build)
        torch._dynamo.reset()
        out_c, _ = run_three_times(torch.compile(model, backend=backend(FORCE)), x)
        torch.testing.assert_close(out, out_c, rtol=1e-10, atol=1e-10)


def test_without_kernels_the_calibrated_cost_model_keeps_exact_attention_and_says_why(
        model, x, kernels_that_fail_to_build):
    rewrites = []
    expected, before = eager(model, x), snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kernels' own warning is the previous test's subject
        out, _ = run_three_times(torch.compile(model, backend=backend(Policy(), rewrites=rewrites)), x)
    decisions = [decision for rewrite in rewrites for _, decision in rewrite.decisions]
    assert decisions and not any(decision.rewrite for decision in decisions)
    # the kernels are checked before lengths: the reason is the kernels (or, on a machine the shipped
    # calibration does not cover, the calibration)
    assert all("C kernels, but this site would run the torch" in decision.reason
               and "simulated: cc failed" in decision.reason
               or "not calibrated" in decision.reason for decision in decisions), decisions
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert_untouched(model, before, x, expected)


def test_a_kernel_library_that_raises_while_deciding_falls_back_with_a_warning(model, x, monkeypatch):
    """Policy() asks cpu.library() while deciding (the cost model is calibrated for the C kernels)."""
    def raising():
        raise AttributeError("simulated: kernels.so has no symbol features_f64")

    monkeypatch.setattr(cpu, "library", raising)
    expected, before = eager(model, x), snapshot(model)
    out, messages = run_three_times(torch.compile(model, backend=backend(Policy())), x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert len(messages) == 1 and "simulated: kernels.so has no symbol" in messages[0], messages
    assert_untouched(model, before, x, expected)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_a_kernel_library_that_raises_at_run_time_never_breaks_the_forward(model, x, monkeypatch, inner):
    """The library is loaded inside the op, at the first call: a damaged cached .so (a missing
    symbol raises AttributeError) must give the torch path, not an exception in the forward."""
    class Damaged:
        def __init__(self, path):
            pass

        def __getattr__(self, name):
            raise AttributeError(f"simulated: kernels.so has no symbol {name}")

    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu.ctypes, "CDLL", Damaged)
    compiler = aot_eager if inner == "aot_eager" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = torch.compile(model, backend=backend(FORCE, inner=compiler))(x)
    assert torch.isfinite(out).all()
    assert cpu.library() is None and "AttributeError: simulated" in cpu.status()


# ---------------------------------------------------------------------------------------------
# Compiling again


def test_compiling_the_same_model_twice_and_after_a_reset_gives_the_same_function(model, x):
    expected, before = eager(model, x), snapshot(model)
    first, second = (torch.compile(model, backend=backend(FORCE)) for _ in range(2))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out_first, out_second = first(x), second(x)
        torch._dynamo.reset()
        out_after_reset = first(x)  # recompiles
        out_fresh = torch.compile(model, backend=backend(FORCE))(x)
    assert not [w for w in caught if "lrcompile" in str(w.message)]
    assert not torch.equal(out_first, expected)  # rewritten
    for out in (out_second, out_after_reset, out_fresh):
        torch.testing.assert_close(out, out_first, rtol=1e-12, atol=1e-12)
    assert_untouched(model, before, x, expected)


def test_a_successful_rewrite_leaves_the_users_module_untouched_and_trains_its_parameters(model, x):
    before = snapshot(model)
    expected = eager(model, x)
    compiled = torch.compile(model, backend=backend(FORCE))
    out = compiled(x.clone().requires_grad_())
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert_untouched(model, before, x, expected)
    assert isinstance(model.attn, NanoGptCausal) and type(model.attn).forward is NanoGptCausal.forward
    # the module still compiles with another backend, as if lrcompile had never seen it
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), expected)


def test_the_registered_backend_name_survives_a_reset(model, x):
    with torch.no_grad():
        first = torch.compile(model, backend="lrcompile")(x)
        torch._dynamo.reset()
        second = torch.compile(model, backend="lrcompile")(x)
    assert torch.equal(first, second)
