"""lrcompile.compile.calibration: a calibration applies only to the machine and kernel path it was measured on."""

import json

import pytest
import torch

import lrcompile
from lrcompile.compile import calibration, machine
from lrcompile.models import gpt2


def entry(key, ratio=0.9, shortest=2000, date="2026-12-01 10:00 UTC"):
    return {"key": key, "measured_on": {"date": date}, "batch_heads": 4, "non_causal": ratio, "causal": ratio,
            "shortest_crossover": shortest, "evidence": []}


@pytest.fixture
def own_file(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(path))
    return path


def test_this_machines_calibration_applies_and_says_where_it_came_from(own_file):
    calibration.save(entry(machine.machine_key("cpu", "c")), own_file)
    found = calibration.lookup("cpu", "c")
    assert found.calibration.non_causal == 0.9
    assert found.description == f"this machine's calibration, measured 2026-12-01 10:00 UTC ({own_file})"


def test_another_machines_calibration_is_not_applied_and_the_reason_says_to_calibrate(own_file):
    other = {**machine.machine_key("cpu", "c"), "name": "AMD EPYC 9999"}
    calibration.save(entry(other), own_file)
    found = calibration.lookup("cpu", "c")
    assert found.calibration is None
    assert "no calibration for this machine and path" in found.description
    assert "'AMD EPYC'" in found.description  # the reference machine is named


@pytest.mark.parametrize("change", [{"threads": 64}, {"implementation": "c-hybrid"}, {"device": "cuda"}])
def test_a_calibration_of_other_threads_or_another_kernel_path_is_not_applied(own_file, change):
    calibration.save(entry({**machine.machine_key("cpu", "c"), **change}), own_file)
    assert calibration.lookup("cpu", "c").calibration is None


def test_the_reference_calibration_applies_on_the_reference_machine_only(own_file, request):
    assert calibration.lookup("cpu", "c").calibration is None  # own_file is empty; this is not the reference
    request.getfixturevalue("on_the_reference_machine")
    found = calibration.lookup("cpu", "c")
    assert found.calibration is not None and found.description.startswith("the reference machine's calibration")


def test_on_a_machine_without_calibration_the_report_keeps_exact_and_says_to_calibrate(own_file):
    model, inputs = gpt2(n=32)
    report = lrcompile.explain(model, *inputs)
    assert not any(site.rewritten for site in report.sites)
    text = str(report)
    assert "not calibrated for this machine" in text and "run `lrcompile calibrate`" in text
    assert "cost model: no calibration for this machine and path" in text


def test_saving_replaces_the_entry_of_the_same_key_and_keeps_the_others(own_file):
    key = machine.machine_key("cpu", "c")
    calibration.save(entry(key, ratio=0.5), own_file)
    calibration.save(entry({**key, "implementation": "torch"}), own_file)
    calibration.save(entry(key, ratio=0.7), own_file)
    entries = json.loads(own_file.read_text())["calibrations"]
    assert [(e["key"]["implementation"], e["non_causal"]) for e in entries] == [("torch", 0.9), ("c", 0.7)]
    assert calibration.lookup("cpu", "c").calibration.non_causal == 0.7  # re-read after the change


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LRCOMPILE_CALIBRATION")
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    assert calibration.writable_path() == tmp_path / "cache" / "calibration.json"
    monkeypatch.delenv("LRCOMPILE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration.user_path() == tmp_path / "xdg" / "lrcompile" / "calibration.json"


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LRCOMPILE_CALIBRATION")
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder should be: mkdir fails
    monkeypatch.setenv("LRCOMPILE_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(calibration, "fallback_dir", lambda: tmp_path / "fallback")
    assert calibration.writable_path() == tmp_path / "fallback" / "calibration.json"


def test_the_c_sweep_counts_the_cores_its_heads_keep_busy():
    assert calibration.busy_cores("c", batch_heads=2, threads=4) == 2
    assert calibration.busy_cores("c", batch_heads=8, threads=4) == 4
    assert calibration.busy_cores("c", batch_heads=6, threads=4) == 3  # two rounds, the second half idle
    assert calibration.busy_cores("c-hybrid", batch_heads=2, threads=4) == 4  # products split over all


def test_the_policy_uses_the_implementation_the_call_will_run(monkeypatch):
    monkeypatch.setenv("LRCOMPILE_KERNELS", "torch")
    assert calibration.implementation_for("cpu", 4) == "torch"
    monkeypatch.delenv("LRCOMPILE_KERNELS")
    from lrcompile.kernels import selector
    cuda = "triton" if not selector.why_not("triton", "cuda", torch.float32, 2, 64, 64) else "torch"
    assert calibration.implementation_for("cuda", 4) == cuda
    hybrid = selector.Choice("c", "torch")
    assert calibration.key_implementation(hybrid) == "c-hybrid"
