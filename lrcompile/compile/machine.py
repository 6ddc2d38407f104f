"""Which machine this is: what a calibration is keyed by.

A measured speed belongs to the processor, the parallelism it was given and the kernel
implementation that ran; `machine_key` names exactly those, and a calibration is applied only
where the key is equal (lrcompile.compile.calibration). The fuller description printed beside
every benchmark table is lrcompile.bench.machine's.
"""

from __future__ import annotations

import functools
import platform

import torch


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def device_name(device_type: str) -> str:
    """The CPU model on "cpu"; the CUDA device's name (MIG slices have names of their own) on "cuda"."""
    if device_type == "cpu":
        return cpu_name()
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"no {device_type} device seen by torch"


def machine_key(device_type: str, implementation: str) -> dict:
    """What a calibration is keyed by: device type, its model name, the CPU threads torch runs with
    (a GPU's parallelism comes with its name: None), and the kernel implementation measured
    ("c", "c-hybrid", "torch", "triton")."""
    return {"device": device_type, "name": device_name(device_type),
            "threads": torch.get_num_threads() if device_type == "cpu" else None,
            "implementation": implementation}


def describe_key(key: dict) -> str:
    threads = f", {key['threads']} threads" if key.get("threads") is not None else ""
    return f"{key['device']} {key['name']!r}{threads}, implementation {key['implementation']!r}"
