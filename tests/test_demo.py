"""lrcompile.demo: on a machine without its own calibration it calibrates first, then shows rewritten sites."""

from lrcompile import demo
from lrcompile.bench import calibrate
from lrcompile.compile import calibration
from lrcompile.compile.machine import machine_key


def measured(shortest, ratio=0.9):
    return {"key": machine_key("cpu", calibration.implementation_for("cpu", demo.MODEL_HEADS)),
            "measured_on": {"date": "2026-12-01 12:00 UTC"}, "batch_heads": demo.MODEL_HEADS, "non_causal": ratio,
            "causal": ratio, "shortest_crossover": shortest, "seconds": 1.0,
            "evidence": [{"method": "lowrank", "causal": False, "measured_crossover": "n = 3000"}]}


def test_an_uncalibrated_machine_is_calibrated_before_the_demo_and_says_so(tmp_path, monkeypatch, capsys):
    path = tmp_path / "calibration.json"
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(path))
    calls = []

    def fake_calibrate(device, heads):  # the measurement itself is test_calibrate's subject
        calls.append((device, heads))
        return measured(3000), str(calibration.save(measured(3000)))

    monkeypatch.setattr(calibrate, "calibrate", fake_calibrate)
    found = demo.ensure_calibrated(demo.MODEL_HEADS)
    assert calls == [("cpu", demo.MODEL_HEADS)] and found.calibration is not None
    out = capsys.readouterr().out
    assert "Calibrating first" in out and "cost model: this machine's calibration" in out
    demo.ensure_calibrated(demo.MODEL_HEADS)
    assert len(calls) == 1  # kept for later runs


def test_the_model_demo_runs_where_this_machines_calibration_rewrites(tmp_path, monkeypatch):
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(tmp_path / "calibration.json"))
    for shortest, requested, expected in ((3000, 4096, 4096), (5000, 4096, 8192), (10**5, 4096, None)):
        calibration.save(measured(shortest))
        found = calibration.lookup("cpu", calibration.implementation_for("cpu", demo.MODEL_HEADS))
        assert demo.model_length(requested, found) == expected


def test_on_the_reference_machine_the_demo_uses_the_shipped_calibration_without_measuring(
        on_the_reference_machine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(tmp_path / "calibration.json"))
    calls = []
    monkeypatch.setattr(calibrate, "calibrate", lambda *args, **kwargs: calls.append(args))
    found = demo.ensure_calibrated(demo.MODEL_HEADS)
    assert calls == [] and found.calibration is not None
    assert "cost model: the reference machine's calibration" in capsys.readouterr().out


def test_the_demo_quotes_the_worst_case_bound_only_where_it_says_something():
    assert "vacuous" not in demo.bound_sentence(0.02, 0.5) and "2.00e-02" in demo.bound_sentence(0.02, 0.5)
    assert "vacuous" in demo.bound_sentence(1.6, 1.0)
