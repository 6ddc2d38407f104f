"""Which machine this is: what measurements are labelled with, and what a calibration is keyed by.

A measured speed belongs to the processor, the parallelism it was given and the kernel
implementation that ran; `machine_key` names exactly those, and a calibration is applied only
where the key is equal (lrcompile.calibration). `machine_info` is the fuller description printed
beside every benchmark table.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform

import torch

from lrcompile import native


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


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_info(device_type: str = "cpu") -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_kernels": native.status(),
            "date": now()}
    if device_type == "cuda":
        info["gpu"] = device_name("cuda")
    return info


def machine_description(device_type: str = "cpu") -> str:
    info = machine_info(device_type)
    gpu = f"{info['gpu']} with " if "gpu" in info else ""
    return (f"{gpu}{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
            f"torch {info['torch']}, {info['date']}; lrcompile CPU kernels: {info['cpu_kernels']}")
