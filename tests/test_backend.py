"""The backend end to end: compiled models against eager ones, forward and parameter gradients."""

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import lrcompile
from attention_corpus import CASES, CASES_BY_NAME, CausalAndKeyPadding, NanoGptCausal
from lrcompile.compile.backend import UnsupportedSiteError, compile_graph
from lrcompile.models import CausalSelfAttention
from lrcompile.compile.policy import Policy
from lrcompile.math.polynomial import exp_polynomial

SUPPORTED = [case for case in CASES if case.expected.supported and all(case.expected.supported)]
KEPT = [case for case in CASES if case.expected.supported and not all(case.expected.supported)]
FORCE = dict(cost_model=False, on_inaccurate="allow")  # every eligible site, computing the polynomial
HIGH_DEGREE_ERROR = exp_polynomial(8, 1.5).relative_error  # about 1e-6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def traced_backend(policy, calls=None):
    """Our rewrite, then AOTAutograd with eager kernels: traces the op's explicit backward like
    Inductor's path does, without Inductor's code generation time."""
    def compiler(gm, example_inputs):
        if calls is not None:
            calls.append(gm)
        return compile_graph(gm, example_inputs, policy, inner=aot_eager)
    return compiler


def loss_and_grads(module, inputs):
    module.zero_grad()
    out = module(*inputs)
    loss = (out.float() ** 2).sum()
    loss.backward()
    return out.detach(), {name.removeprefix("_orig_mod."): p.grad.clone()
                          for name, p in module.named_parameters() if p.grad is not None}


def assert_model_close(compiled, eager, inputs, tolerance):
    out, grads = loss_and_grads(compiled, inputs)
    expected_out, expected_grads = loss_and_grads(eager, inputs)
    assert (out - expected_out).abs().max() <= tolerance * max(1.0, expected_out.abs().max())
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        scale = max(1.0, expected_grads[name].abs().max().item())
        assert (grad - expected_grads[name]).abs().max() <= tolerance * scale, name


@pytest.mark.parametrize("case", SUPPORTED, ids=lambda case: case.name)
def test_every_supported_spelling_compiles_to_the_same_function_at_high_degree(case):
    # The corpus's random models keep |scores| below 1.5, where degree 8 is within
    # HIGH_DEGREE_ERROR of exp: outputs and gradients must agree to a small multiple of it.
    module, inputs = case.build()
    compiled = torch.compile(module, backend=traced_backend(Policy(degree=8, **FORCE)))
    tolerance = 20 * HIGH_DEGREE_ERROR if case.dtype == torch.float64 else 1e-3
    assert_model_close(compiled, module, inputs, tolerance)


@pytest.mark.parametrize("case", SUPPORTED[:12], ids=lambda case: case.name)
def test_degree_2_error_stays_within_the_reported_bound(case):
    module, inputs = case.build()
    report = lrcompile.explain(module, *inputs, policy=Policy(**FORCE))
    assert report.sites and all(site.rewritten for site in report.sites)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=traced_backend(Policy(**FORCE)))
    with torch.no_grad():
        error = (compiled(*inputs) - module(*inputs)).abs().max().item()
    assert error > 0  # really rewritten: degree 2 is not exact
    # Output error per site is at most error_bound * max|v|; through the output projection and
    # the other layers it grows by their norms, so compare against a generous multiple.
    worst_bound = max(site.error_bound for site in report.sites)
    assert error <= 50 * worst_bound


@pytest.mark.parametrize("case", KEPT, ids=lambda case: case.name)
def test_kept_sites_leave_the_model_exact(case):
    module, inputs = case.build()
    compiled = torch.compile(module, backend=traced_backend(Policy(**FORCE)))
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout draws for both (cases kept for dropout in training)
        out = compiled(*inputs)
        torch.manual_seed(1)
        torch.testing.assert_close(out, module(*inputs))


@pytest.mark.parametrize("name", ["nanogpt_causal_buffer", "sdpa_causal_and_key_padding", "gqa_repeat_interleave",
                                  "additive_key_padding_bert_style"])
def test_inductor_compiles_the_factored_forward_and_backward(name):
    case = next(case for case in SUPPORTED if case.name == name)
    module, inputs = case.build()
    compiled = torch.compile(module, backend=lrcompile.backend(Policy(degree=8, **FORCE)))
    assert_model_close(compiled, module, inputs, 20 * HIGH_DEGREE_ERROR)


def test_excluding_every_site_gives_exactly_the_inductor_result():
    module, inputs = CASES[9].build()  # nanogpt
    module = module.float()
    inputs = tuple(x.float() if x.is_floating_point() else x for x in inputs)
    ours = torch.compile(module, backend=lrcompile.backend(Policy(exclude=("*",))))(*inputs)
    torch._dynamo.reset()
    inductor = torch.compile(module, backend="inductor")(*inputs)
    assert torch.equal(ours, inductor)


def test_model_without_attention_is_unchanged():
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    calls = []
    compiled = torch.compile(module, backend=traced_backend(Policy(**FORCE), calls))
    torch.testing.assert_close(compiled(x), module(x))
    assert calls  # the backend was really used


def test_backend_is_registered_by_name():
    module, inputs = NanoGptCausal().float().eval(), (torch.randn(2, 8, 16),)
    compiled = torch.compile(module, backend="lrcompile")
    # Default policy: at n = 8 the cost model keeps exact attention.
    torch.testing.assert_close(compiled(*inputs), module(*inputs), rtol=1e-5, atol=1e-5)


def test_training_step_runs_and_updates_parameters():
    torch.manual_seed(0)
    module = CausalAndKeyPadding().float()
    x, keep = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    compiled = torch.compile(module, backend=lrcompile.backend(Policy(**FORCE)))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = [p.detach().clone() for p in module.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        loss = compiled(x, keep).pow(2).mean()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, p) for a, p in zip(before, module.parameters()))


def test_a_failing_rewrite_falls_back_to_the_original_graph_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr("lrcompile.compile.backend.replace_attention_site", broken)
    module, inputs = CASES[9].build()
    compiled = torch.compile(module, backend=traced_backend(Policy(**FORCE)))
    with pytest.warns(UserWarning, match=r"lrcompile: rewriting failed .*replacing site \w+ \(root\) failed: simulated failure"):
        out = compiled(*inputs)
    torch.testing.assert_close(out, module(*inputs))


def test_on_unsupported_error_and_warn():
    case = next(case for case in KEPT if case.name == "alibi_bias")
    module, inputs = case.build()
    with pytest.raises(Exception, match="kept exact: .*varies along the query axis"):
        torch.compile(module, backend=traced_backend(Policy(on_unsupported="error")))(*inputs)
    assert issubclass(UnsupportedSiteError, RuntimeError)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="kept exact"):
        torch.compile(module, backend=traced_backend(Policy(on_unsupported="warn")))(*inputs)


def test_min_seq_len_is_a_guard_under_dynamic_shapes():
    module = CausalSelfAttention(n_embd=16, n_head=2, block_size=128).double()  # nanoGPT attention
    calls = []
    compiled = torch.compile(module, backend=traced_backend(Policy(min_seq_len=48, **FORCE), calls), dynamic=True)
    short, long = torch.randn(2, 40, 16, dtype=torch.float64), torch.randn(2, 64, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(short), module(short))  # kept: exact
        long_error = (compiled(long) - module(long)).abs().max().item()
        torch.testing.assert_close(compiled(short), module(short))
    assert long_error > 1e-9  # rewritten: degree 2 differs from exact
    assert len(calls) == 2  # the second shape recompiled instead of reusing the first decision


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_transformers_models_compile_to_the_same_function_within_the_degree_4_bound(name):
    # head dim 32: degree 4 has r = C(36, 4) = 58905 features (degree 8 would have 77 million).
    # These random models keep |scores| < 0.5, where degree 4 is within DEGREE_4_ERROR of exp.
    from lrcompile.models import BUILT_IN, first_tensor

    model, inputs = BUILT_IN[name](n=24)
    model = model.double().train()  # training mode: gradients flow; dropout is 0 in these configs
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    calls = []
    compiled = torch.compile(model, backend=traced_backend(Policy(degree=4, **FORCE), calls))

    def output_and_grads(module):
        module.zero_grad()
        out = first_tensor(module(*inputs))
        (out**2).mean().backward()
        named = getattr(module, "_orig_mod", module).named_parameters()
        return out.detach(), {n: p.grad.clone() for n, p in named if p.grad is not None}

    out, grads = output_and_grads(compiled)
    expected, expected_grads = output_and_grads(model)
    tolerance = 20 * exp_polynomial(4, 0.5).relative_error
    assert 0 < (out - expected).abs().max() <= tolerance * max(1, expected.abs().max().item())
    for key, grad in expected_grads.items():
        assert (grads[key] - grad).abs().max() <= tolerance * max(1, grad.abs().max().item()), key
    assert calls


@pytest.fixture
def without_inductor(monkeypatch):
    """lrcompile.backend() hands graphs to AOTAutograd with eager kernels instead: seconds faster."""
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx",
                        lambda gm, example_inputs, **kwargs: aot_eager(gm, example_inputs))


def test_a_pattern_matching_no_module_warns_once_naming_the_real_paths(without_inductor):
    module, (x, keep) = CASES_BY_NAME["two_layers"].build()  # sites in modules "first" and "second"
    compiled = torch.compile(module, backend=lrcompile.backend(Policy(include=("layers.*",), exclude=("first",))),
                             dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x, keep)
        compiled(x[:, :6], keep[:, :6])  # a second graph: no second warning
    messages = [str(w.message) for w in caught if "matches no module" in str(w.message)]
    assert len(messages) == 1
    assert "include pattern 'layers.*'" in messages[0] and "'first'" in messages[0]


def test_patterns_that_match_a_module_do_not_warn(without_inductor):
    module, inputs = CASES_BY_NAME["two_layers"].build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(module, backend=lrcompile.backend(Policy(include=("f*",), exclude=("second",))))(*inputs)
    assert not [w for w in caught if "matches no module" in str(w.message)]


COMPILE_SETTINGS = [  # (backend, torch.compile keywords): each Inductor compile costs seconds
    ("by_name", dict(mode="reduce-overhead")),
    ("by_name", dict(mode="max-autotune-no-cudagraphs")),
    ("by_name", dict(options={"epilogue_fusion": True, "max-autotune": False})),
    ("with_policy", dict(mode="max-autotune-no-cudagraphs")),
    ("with_policy", dict(options={"epilogue_fusion": True})),
]


@pytest.mark.parametrize("how, settings", COMPILE_SETTINGS, ids=lambda value: str(value))
def test_torch_compile_mode_and_options_reach_inductor(how, settings, monkeypatch):
    from torch._inductor import compile_fx as compile_fx_module

    received = []
    real_compile_fx = compile_fx_module.compile_fx

    def recording_compile_fx(gm, example_inputs, **kwargs):
        received.append(kwargs.get("config_patches") or {})
        return real_compile_fx(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    module, inputs = NanoGptCausal().float().eval(), (torch.randn(2, 8, 16),)
    backend = "lrcompile" if how == "by_name" else lrcompile.backend(Policy(degree=8, **FORCE))
    compiled = torch.compile(module, backend=backend, **settings)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), module(*inputs), rtol=1e-4, atol=1e-4)

    expected = (torch._inductor.list_mode_options(settings["mode"]) if "mode" in settings
                else {key.replace("-", "_"): value for key, value in settings["options"].items()})
    assert received[0] == expected  # compile_fx then calls itself, inside those patches, without them


def test_an_unknown_inductor_option_is_named():
    module, inputs = NanoGptCausal().float().eval(), (torch.randn(2, 8, 16),)
    compiled = torch.compile(module, backend="lrcompile", options={"no_such_option": True})
    with pytest.raises(Exception, match="unknown Inductor option 'no_such_option'"):
        compiled(*inputs)


class QueryBiasedLayers(torch.nn.Module):
    """Four attention layers with a bias varying along queries: every site is kept exact."""

    def forward(self, x):
        n = x.shape[-2]
        bias = -(torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().float()
        for _ in range(4):
            x = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=bias)
        return x


def test_on_unsupported_warn_warns_once_per_site_across_recompiles():
    torch._dynamo.reset()
    module = QueryBiasedLayers()
    compiled = torch.compile(module, backend=lrcompile.backend(Policy(on_unsupported="warn", **FORCE)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (16, 24, 40):  # the second length recompiles (automatic dynamic)
            compiled(torch.randn(1, 2, n, 8))
    kept = [w for w in caught if "kept exact" in str(w.message)]
    assert len(kept) == 4, [str(w.message) for w in kept]
