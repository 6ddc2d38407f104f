"""Peak memory of one step, measured in a child process (Linux: /proc/self).

A step's peak is only its own in a process that did nothing bigger before, so every measured row
runs in a fresh child (`run_child`), which warms up, lowers the peak-RSS mark to the current
resident set, runs one step and prints the growth as JSON. Not to be confused with
`lrcompile.math.memory_budget`, which decides how much memory the feature states may take.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """The process's peak resident set (VmHWM). Not ru_maxrss: that also keeps the peak recorded
    whenever a thread exits (Inductor's compile threads do), which reset_peak_rss cannot lower."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM line in /proc/self/status")


def reset_peak_rss() -> bool:
    """Lower the peak-RSS high-water mark to the current RSS (Linux >= 4.0, /proc/self/clear_refs).

    Lets a child compile at full size and then measure only the step. False where not allowed.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return peak_rss() <= current_rss() + (1 << 20)
    except OSError:
        return False


def peak_growth(step: Callable[[], None], warm_up: Callable[[], None]) -> tuple[int | None, str]:
    """Peak RSS growth of `step` after `warm_up`, or (None, why not)."""
    warm_up()
    gc.collect()
    if not reset_peak_rss():
        return None, "peak RSS cannot be reset here (/proc/self/clear_refs), so the warm-up's peak would count"
    before = current_rss()
    step()
    return peak_rss() - before, ""


def run_child(module_or_script: list[str], extra_args: list[str]) -> dict:
    """Run a child Python (`-m module` or a script path) and parse the JSON of its last line.

    glibc is told to mmap every buffer over 128 KiB separately, so freed buffers go back to the
    system instead of staying in the heap: the peak is then the step's own, rounded up to pages.
    """
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding lrcompile
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, *module_or_script, *extra_args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"peak_bytes": None, "note": f"child failed (exit {done.returncode}): {' | '.join(tail)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])
