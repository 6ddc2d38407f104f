"""lrcompile.bench.calibrate: the fit of measured runs, and `lrcompile calibrate` writing what the policy then uses."""

from types import SimpleNamespace

import pytest

from lrcompile.bench import calibrate
from lrcompile.compile import calibration
from lrcompile.cli import main
from lrcompile.compile.policy import Policy, decide


def long_site(n=10**6, heads=2):
    """A non-causal site on the CPU where low-rank is far cheaper by FLOPs (d = 64)."""
    shape = (1, heads, n, 64)
    return SimpleNamespace(name="softmax", module_path="attn", supported=True, reason="", replacement=None,
                           is_causal=False, query_shape=shape, key_shape=shape, value_shape=shape, device="cpu",
                           masked_rows="visible")


def synthetic_result(crossovers, head_dim=64, degree=2, ns=(1024, 2048, 4096, 8192), method="lowrank"):
    """A bench result whose method/sdpa time ratio crosses 1 at the given n per mask."""
    rows = []
    for causal, crossing in crossovers.items():
        for n in ns:
            rows.append({"method": "sdpa", "n": n, "causal": causal, "total_s": 1.0, "flops": 1e9})
            rows.append({"method": method, "n": n, "causal": causal, "total_s": crossing / n, "flops": 1e8})
    return {"settings": {"head_dim": head_dim, "degree": degree, "causal": list(crossovers), "n": list(ns),
                         "device": "cpu", "batch": 1, "heads": 4},
            "machine": {"cpu": "test CPU", "torch_threads": 2}, "rows": rows,
            "implementations": {"lowrank": "c", "lowrank_torch": "torch"}}


def test_calibration_takes_the_smallest_ratio_over_configurations():
    results = [synthetic_result({False: 2000, True: 5000}), synthetic_result({False: 3000, True: 6000}, head_dim=32,
                                                                            degree=3)]
    (entry,) = calibrate.calibration_from(results)
    for causal, key in ((False, "non_causal"), (True, "causal")):
        implied = [e["ratio"] for e in entry["evidence"] if e["causal"] == causal]
        assert len(implied) == 2 and entry[key] == min(implied)
    assert entry["shortest_crossover"] == 2000
    assert entry["key"] == {"device": "cpu", "name": "test CPU", "threads": 2, "implementation": "c"}
    assert entry["batch_heads"] == 4


def test_each_kernel_implementation_gets_its_own_calibration():
    entries = calibrate.calibration_from([synthetic_result({False: 2000, True: 5000}),
                                          synthetic_result({False: 9000, True: 9000}, method="lowrank_torch")])
    assert sorted(e["key"]["implementation"] for e in entries) == ["c", "torch"]


def test_a_mask_that_never_crossed_keeps_exact_attention_up_to_the_largest_n_measured():
    (entry,) = calibrate.calibration_from([synthetic_result({False: 2000, True: 10**6})])
    assert entry["shortest_crossover"] == 2000  # the non-causal crossover, the shortest of all
    causal = next(e for e in entry["evidence"] if e["causal"])
    # the achieved FLOP-rate ratio at n = 8192, where low-rank took 10**6 / 8192 times sdpa's time
    assert causal["n"] == 8192 and causal["ratio"] == pytest.approx(0.1 / (10**6 / 8192))


def test_a_run_without_low_rank_against_sdpa_cannot_calibrate():
    result = synthetic_result({False: 2000, True: 5000})
    result["rows"] = [r for r in result["rows"] if r["method"] == "sdpa"]
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate.calibration_from([result])


def test_calibrate_writes_this_machines_calibration_and_the_policy_then_uses_it(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "calibration.json"
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(path))
    assert calibration.lookup("cpu", "c").calibration is None
    entry, written = calibrate.calibrate(sizes=(64, 128), repeats=1, heads=2)
    assert written == str(path) and path.exists()
    assert entry["key"]["implementation"] == calibration.implementation_for("cpu", 2)
    decision = decide(long_site(), Policy())
    assert decision.calibration.startswith("this machine's calibration, measured") and str(path) in decision.calibration
    assert decision.rewrite == (entry["key"]["implementation"] == "c")  # the path measured is the one deciding


def test_calibrate_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(tmp_path / "calibration.json"))
    assert main(["calibrate", "--n", "64", "128", "--repeats", "1", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "calibrated cpu" in out and str(tmp_path / "calibration.json") in out
    assert "crossover with SDPA" in out


def test_the_shipped_reference_calibration_is_what_its_saved_run_implies(on_the_reference_machine):
    import json
    from pathlib import Path

    saved = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "op_speed.json").read_text())
    (entry,) = calibrate.calibration_from(saved)
    reference = on_the_reference_machine
    assert entry["key"]["name"] == reference["key"]["name"] and entry["batch_heads"] == reference["batch_heads"]
    for field in ("non_causal", "causal", "shortest_crossover"):
        assert entry[field] == pytest.approx(reference[field], rel=1e-12)


def test_calibration_times_the_factored_algorithm_whose_flops_the_cost_model_counts(monkeypatch):
    from lrcompile.ops import algorithm

    chosen = []
    uses_direct = algorithm.uses_direct
    monkeypatch.setattr(algorithm, "uses_direct", lambda *args: chosen.append(uses_direct(*args)) or chosen[-1])
    assert uses_direct(128, 128, 64, 64, 1, 2, False, 512, "cpu")  # left alone, the op would go direct
    calibrate.measure(sizes=(128,), repeats=1, heads=1, progress_factory=lambda **kwargs: _Silent())
    assert chosen and not any(chosen)


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass
