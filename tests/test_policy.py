import dataclasses
from types import SimpleNamespace

import pytest

from lrcompile.compile import calibration, cost_model
from lrcompile.compile.policy import Policy, decide, unmatched_patterns
from lrcompile.math.polynomial import degree_for, exp_polynomial


def site(n=4096, d=64, causal=False, path="h.0.attn", supported=True, reason="", device="cpu"):
    return SimpleNamespace(
        name="softmax", module_path=path, supported=supported, reason=reason, replacement=None, is_causal=causal,
        query_shape=(2, 4, n, d), key_shape=(2, 4, n, d), value_shape=(2, 4, n, d), device=device,
        masked_rows="visible",
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(degree=0), "degree"),
        (dict(degree="three"), "degree"),
        (dict(degree="auto"), "tolerance"),
        (dict(approximation="pade"), "approximation"),
        (dict(bound=-1.0), "bound"),
        (dict(tolerance=2.0), "tolerance"),
        (dict(min_seq_len=-5), "min_seq_len"),
        (dict(causal_chunk=0), "causal_chunk"),
        (dict(on_unsupported="ignore"), "on_unsupported"),
    ],
)
def test_bad_policy_says_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Policy(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cost_model="no"), "cost_model must be True or False, got 'no'"),  # truthy: would stay on
        (dict(include=None), "include must be a string or a sequence"),
        (dict(exclude=[1]), "exclude must be a string or a sequence"),
        (dict(bound="3"), "bound must be a number"),
        (dict(max_error=None), "max_error must be a number"),
        (dict(on_inaccurate=True), "on_inaccurate must be one of"),
        (dict(approximation=None), "approximation must be one of"),
    ],
)
def test_wrong_types_are_refused_with_what_is_accepted(kwargs, message):
    with pytest.raises(TypeError, match=message):
        Policy(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(causal_chunk=True), "causal_chunk must be a positive int"),  # a bool is an int
        (dict(max_error=-0.5), "max_error must be a finite number"),
        (dict(max_error=float("inf")), "max_error must be a finite number"),
        (dict(on_inaccurate="fallback"), "on_inaccurate must be one of"),
    ],
)
def test_out_of_range_guard_and_chunk_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Policy(**kwargs)


def test_rewritten_sites_carry_the_guard_settings_and_their_label():
    decision = decide(site(), Policy(cost_model=False, max_error=0.05, on_inaccurate="warn"))
    assert decision.lowrank_kwargs["config"] is decision.config
    assert decision.config.max_error == 0.05
    assert decision.config.on_inaccurate == "warn"
    assert decision.config.site_label == "h.0.attn:softmax"


def test_sites_whose_feature_states_exceed_the_memory_budget_are_kept_with_the_degree_that_fits():
    decision = decide(site(d=32), Policy(degree=8, cost_model=False))  # r = C(40, 8) = 76,904,685
    assert not decision.rewrite
    assert "r = C(32+8, 8)" in decision.reason and "largest degree that fits" in decision.reason
    small = decide(site(d=32), Policy(degree=2, cost_model=False, memory_budget=1000))
    assert not small.rewrite and "memory budget of 1,000 bytes" in small.reason
    assert decide(site(d=32), Policy(degree=2, cost_model=False)).lowrank_kwargs["memory_budget"] is None


def test_very_wide_ranges_keep_the_site_instead_of_failing():
    decision = decide(site(), Policy(degree=16, approximation="chebyshev", bound=900.0, cost_model=False))
    assert not decision.rewrite and "too wide" in decision.reason


def test_a_single_pattern_string_is_accepted():
    assert Policy(include="h.*.attn").include == ("h.*.attn",)


def test_include_and_exclude_match_module_paths():
    policy = Policy(include=("h.*.attn",), exclude=("h.1.*",), cost_model=False)
    assert decide(site(path="h.0.attn"), policy).rewrite
    kept = decide(site(path="h.1.attn"), policy)
    assert not kept.rewrite and "excluded by pattern 'h.1.*'" in kept.reason
    kept = decide(site(path="encoder.attn"), policy)
    assert not kept.rewrite and "matches no include pattern" in kept.reason


def test_unsupported_site_is_kept_with_its_reason():
    decision = decide(site(supported=False, reason="mask is general"), Policy())
    assert not decision.rewrite and decision.reason == "mask is general"


def test_min_seq_len_keeps_short_sequences():
    policy = Policy(min_seq_len=1024, cost_model=False)
    assert "key length 512 < min_seq_len 1024" in decide(site(n=512), policy).reason
    assert decide(site(n=1024), policy).rewrite


def this_machine(causal=False):
    """The calibration in use (conftest installs the reference's as this machine's): ratio and shortest n."""
    applied = calibration.lookup("cpu", "c").calibration
    return dict(ratio=applied.rate_ratio(causal), shortest_crossover=applied.shortest_crossover_for(causal))


def test_cost_model_keeps_exact_where_it_is_cheaper_and_names_the_crossover():
    crossover = cost_model.crossover_length(64, 64, False, 2, **this_machine())
    short = decide(site(n=crossover // 2), Policy())
    assert not short.rewrite and f"about n = {crossover}" in short.reason
    assert decide(site(n=crossover * 2), Policy()).rewrite
    assert decide(site(n=crossover // 2), Policy(cost_model=False)).rewrite


def test_below_the_shortest_measured_crossover_exact_attention_is_kept_whatever_the_flops():
    shortest = this_machine()["shortest_crossover"]
    flops_alone = cost_model.crossover_length(16, 16, False, 2, ratio=this_machine()["ratio"])
    assert 0 < flops_alone < shortest and cost_model.crossover_length(16, 16, False, 2, **this_machine()) == shortest
    kept = decide(site(n=shortest - 1, d=16), Policy())
    assert not kept.rewrite and "below the shortest crossover measured" in kept.reason
    assert decide(site(n=shortest, d=16), Policy()).rewrite


def test_a_causal_site_is_measured_against_the_causal_crossover_not_the_non_causal_one():
    """Causal attention crosses over later (SDPA skips the masked half): the reference machine measured
    n = 2068 non-causal and 3993 causal at d = 64, and a causal site's reason must quote the latter."""
    non_causal, causal = this_machine(False)["shortest_crossover"], this_machine(True)["shortest_crossover"]
    assert non_causal < causal
    kept = decide(site(n=(non_causal + causal) // 2, d=16, causal=True), Policy())
    assert not kept.rewrite and f"(n = {causal})" in kept.reason and "causal attention" in kept.reason
    assert decide(site(n=(non_causal + causal) // 2, d=16, causal=False), Policy()).rewrite


def test_the_reasons_name_both_the_policy_field_and_the_command_line_flag_that_force_the_rewrite():
    kept = decide(site(n=64), Policy())
    assert "Policy(cost_model=False)" in kept.reason and "--no-cost-model" in kept.reason


def test_a_device_the_cost_model_was_not_calibrated_for_keeps_exact_attention():
    kept = decide(site(n=10**6, device="cuda"), Policy())
    assert not kept.rewrite and "not calibrated for this machine" in kept.reason
    runs = kept.kernel.implementation  # triton where it imports, else the torch sweep
    assert "lrcompile calibrate" in kept.reason and f"implementation '{runs}'" in kept.reason
    assert decide(site(n=10**6, device="cuda"), Policy(cost_model=False)).rewrite


def test_without_the_c_kernels_the_c_calibration_does_not_apply(monkeypatch):
    from lrcompile.kernels import cpu

    monkeypatch.setattr(cpu, "enabled", lambda: False)  # the torch path is several times slower
    kept = decide(site(n=10**6), Policy())
    assert not kept.rewrite and "not calibrated" in kept.reason and "implementation 'torch'" in kept.reason


def test_the_decision_names_the_calibration_that_decided():
    decision = decide(site(n=10**6), Policy())
    assert decision.rewrite and decision.calibration.startswith("this machine's calibration, measured 2026-11-25")
    assert decide(site(n=10**6), Policy(cost_model=False)).calibration == ""


def test_fewer_heads_than_threads_leave_the_c_sweep_cores_idle(monkeypatch):
    """The C sweep runs one head per thread: with 4 threads, 2 heads keep 2 cores busy where SDPA
    uses all 4, so the same n that pays off with 4 heads does not with 2."""
    applied = calibration.lookup("cpu", "c").calibration
    assert applied.rate_ratio(False, 2) == applied.rate_ratio(False, 4)  # 2 threads here: both fill them
    four_threads = dataclasses.replace(applied, key={**applied.key, "threads": 4}, batch_heads=4)
    assert four_threads.rate_ratio(False, 2) == pytest.approx(four_threads.rate_ratio(False) / 2)
    assert four_threads.rate_ratio(False, 6) == pytest.approx(four_threads.rate_ratio(False) * 3 / 4)  # 2 rounds


def test_crossover_falls_with_head_dim_and_rises_with_degree():
    ratio = this_machine()["ratio"]
    assert cost_model.crossover_length(16, 16, False, 2, ratio=ratio) < cost_model.crossover_length(64, 64, False, 2, ratio=ratio)
    assert cost_model.crossover_length(32, 32, False, 2, ratio=ratio) < cost_model.crossover_length(32, 32, False, 3, ratio=ratio)


def test_auto_degree_is_the_smallest_meeting_the_tolerance_for_the_measured_range():
    policy = Policy(degree="auto", tolerance=1e-3, cost_model=False)
    decision = decide(site(d=8), policy, measured_range=1.5)  # degree 8: r = C(16, 8) fits; d = 64 would not
    assert decision.rewrite and decision.degree == degree_for(1e-3, 1.5, "taylor")
    assert decision.config.coefficients == exp_polynomial(decision.degree, 1.5, "taylor").coefficients


def test_auto_degree_without_a_range_is_kept():
    decision = decide(site(), Policy(degree="auto", tolerance=1e-3, cost_model=False))
    assert not decision.rewrite and "needs a score range" in decision.reason


def test_range_too_wide_for_any_degree_is_kept_exact():
    decision = decide(site(), Policy(degree="auto", tolerance=1e-6, cost_model=False), measured_range=40.0)
    assert not decision.rewrite and "too wide" in decision.reason


def test_polynomial_not_positive_on_measured_range_is_kept():
    decision = decide(site(), Policy(degree=3, cost_model=False), measured_range=3.0)
    assert not decision.rewrite and "not positive" in decision.reason


def test_fixed_degree_over_tolerance_is_kept():
    decision = decide(site(), Policy(degree=2, tolerance=1e-3, cost_model=False), measured_range=2.0)
    assert not decision.rewrite and "exceeds tolerance" in decision.reason


def test_policy_bound_overrides_the_measured_range():
    decision = decide(site(), Policy(degree=4, bound=0.5, cost_model=False), measured_range=9.0)
    assert decision.rewrite and decision.score_range == 0.5


def test_even_taylor_needs_no_range_but_odd_does():
    assert decide(site(), Policy(degree=2, cost_model=False)).rewrite
    kept = decide(site(), Policy(degree=3, cost_model=False))
    assert not kept.rewrite and "needs a score range" in kept.reason


def test_causal_chunk_is_passed_to_the_op():
    decision = decide(site(causal=True), Policy(causal_chunk=64, cost_model=False))
    assert decision.config.chunk_size == 64


def test_unmatched_patterns_are_those_matching_no_module_path():
    policy = Policy(include=("h.*.attn", "layers.*"), exclude=("<root>", "h.1"))
    assert unmatched_patterns(policy, {"", "h", "h.0", "h.0.attn"}) == ["layers.*", "h.1"]
