"""Shared fixtures: fresh random attention inputs with a stated score range."""

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
