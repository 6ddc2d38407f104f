"""The machine a benchmark ran on, described beside every table it prints or writes."""

from __future__ import annotations

import datetime
import os
import platform

import torch

from lrcompile.compile.machine import cpu_name, device_name
from lrcompile.kernels import cpu


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_info(device_type: str = "cpu") -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_kernels": cpu.status(),
            "date": now()}
    if device_type == "cuda":
        info["gpu"] = device_name("cuda")
    return info


def machine_description(device_type: str = "cpu") -> str:
    info = machine_info(device_type)
    gpu = f"{info['gpu']} with " if "gpu" in info else ""
    return (f"{gpu}{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
            f"torch {info['torch']}, {info['date']}; lrcompile CPU kernels: {info['cpu_kernels']}")
