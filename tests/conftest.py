"""Shared fixtures: fresh random attention inputs with a stated score range, and a machine identity
that does not depend on which machine runs the suite."""

import json

import pytest
import torch

from lrcompile.reference import random_attention_inputs


attention_inputs = random_attention_inputs


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after: each compile in the test starts from nothing."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _this_machine_has_the_reference_calibration(_deterministic_threads, tmp_path_factory, monkeypatch):
    """The cost model as on the reference machine, whatever machine runs the suite.

    Calibrations apply only to the machine and kernel path they were measured on, so on any other
    machine the default policy would keep every site exact. Tests about the policy's decisions
    need them to be the same everywhere: this installs the shipped reference calibration, keyed to
    this machine's C path, as this machine's (via LRCOMPILE_CALIBRATION, which child processes
    inherit). Tests about calibrations themselves point LRCOMPILE_CALIBRATION elsewhere.
    """
    from lrcompile.compile import calibration
    from lrcompile.compile.machine import machine_key

    key = machine_key("cpu", "c")
    path = tmp_path_factory.getbasetemp() / f"calibration-{key['threads']}-threads.json"
    if not path.exists():
        (reference,) = calibration.read(calibration.REFERENCE_PATH)
        calibration.save({**reference, "key": key}, path)
    monkeypatch.setenv("LRCOMPILE_CALIBRATION", str(path))


SHIPPED_REFERENCE_PATH = None  # the package's reference_calibration.json, before any fixture redirects it


@pytest.fixture(autouse=True)
def _the_reference_machine_is_another_machine(tmp_path_factory, monkeypatch):
    """The shipped reference calibration, keyed to a machine that is never the one running the suite.

    Calibrations apply where the machine key is equal, so on a machine whose key happens to equal
    the reference machine's (a 2-core "AMD EPYC" VM, say) tests about an uncalibrated machine would
    see the reference calibration instead. Tests that need the reference machine ask for
    `on_the_reference_machine`.
    """
    from lrcompile.compile import calibration

    global SHIPPED_REFERENCE_PATH
    SHIPPED_REFERENCE_PATH = SHIPPED_REFERENCE_PATH or calibration.REFERENCE_PATH
    path = tmp_path_factory.getbasetemp() / "reference-calibration-elsewhere.json"
    if not path.exists():
        entries = [{**entry, "key": {**entry["key"], "name": f"{entry['key']['name']} (elsewhere)"}}
                   for entry in calibration.read(SHIPPED_REFERENCE_PATH)]
        path.write_text(json.dumps({"calibrations": entries}))
    monkeypatch.setattr(calibration, "REFERENCE_PATH", path)


@pytest.fixture
def on_the_reference_machine(monkeypatch):
    """This process takes the reference machine's identity (CPU name, threads) and sees the shipped
    reference calibration; returns that calibration's entry."""
    from lrcompile.compile import calibration, machine

    monkeypatch.setattr(calibration, "REFERENCE_PATH", SHIPPED_REFERENCE_PATH)
    (reference,) = calibration.read(SHIPPED_REFERENCE_PATH)
    monkeypatch.setattr(machine, "cpu_name", lambda: reference["key"]["name"])
    monkeypatch.setattr(machine.torch, "get_num_threads", lambda: reference["key"]["threads"])
    return reference
