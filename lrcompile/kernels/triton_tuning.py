"""The Triton kernels' tiles per (head dim, degree, dtype, causal), chosen by timing on a GPU.

A small fixed space, SPACE, of (row tile, causal chunk) pairs is timed forward + backward by
`benchmarks/gpu_check.py` (its autotune step) on the GPU at hand; the best of each configuration
is recorded as JSON, keyed by the device's name:

    {"device": "NVIDIA H200", "choices": {"d64-g2-bfloat16-causal": {"block": 64, "chunk": 256, "ms": ...}}}

`lrcompile.kernels.triton` reads the file named by LRCOMPILE_TRITON_TUNING, else triton_tuning.json
beside this module (gpu_check writes one into its output folder; copy it here to ship it), and uses
a choice only on the device it was timed on. Without one, the launchers' defaults apply. The choice
is read once per process (cached) and `choice` says which tiles a call runs with.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

SPACE = ((32, 256), (64, 256), (32, 512), (64, 512))  # (row tile, causal chunk)
ENVIRONMENT_VARIABLE = "LRCOMPILE_TRITON_TUNING"
SHIPPED = Path(__file__).with_name("triton_tuning.json")


def key(head_dim: int, degree: int, dtype: str, causal: bool) -> str:
    """"d64-g2-bfloat16-causal": dtype as torch names it without "torch."."""
    return f"d{head_dim}-g{degree}-{str(dtype).removeprefix('torch.')}-{'causal' if causal else 'full'}"


def path() -> Path:
    return Path(os.environ.get(ENVIRONMENT_VARIABLE) or SHIPPED)


@functools.cache
def _load(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def choice(head_dim: int, degree: int, dtype, causal: bool, device_name: str) -> dict | None:
    """{"block": ..., "chunk": ..., "ms": ...} timed on `device_name` for this configuration, or None."""
    table = _load(path())
    if table.get("device") != device_name:
        return None
    return table.get("choices", {}).get(key(head_dim, degree, dtype, causal))


def record(rows: list[dict], device_name: str, file: Path) -> dict:
    """Write the best of each timed configuration (gpu_check's autotune rows) to `file`; the table."""
    table = {"device": device_name,
             "space": [list(pair) for pair in SPACE],
             "choices": {key(row["head_dim"], row["degree"], row["dtype"], row["causal"]): row["best"] for row in rows}}
    file.write_text(json.dumps(table, indent=2) + "\n")
    _load.cache_clear()
    return table
