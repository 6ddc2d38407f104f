"""The cost model's calibrations: where they are stored, and which one (if any) applies to a call.

A calibration is the low-rank path's FLOP rate relative to exact attention's, measured on one
machine for one kernel implementation (lrcompile.bench.calibrate). Speeds do not transfer between
processors, thread counts or implementations, so each calibration carries its `machine_key`
(lrcompile.compile.machine) and is applied only where the key is equal; anywhere else the device counts
as not calibrated and the policy keeps exact attention, saying so.

Two files are read, this machine's first:

    <cache>/calibration.json                 written by `lrcompile calibrate` (any number of keys)
    lrcompile/compile/reference_calibration.json   shipped: the reference machine's, measured for
                                             benchmarks/RESULTS.md; applies only to that machine

<cache> is $LRCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/lrcompile, else ~/.cache/lrcompile; where that
cannot be written, `lrcompile calibrate` falls back to <tmp>/lrcompile-<uid> (and reads it there).
$LRCOMPILE_CALIBRATION names the file itself instead (a CI job's, a test suite's), for reading and
writing.

File format: {"about": "...", "calibrations": [entry, ...]}, entry = {"key": machine_key,
"measured_on": machine_info, "batch_heads": problems per call when measured, "non_causal": ratio,
"causal": ratio, "shortest_crossover": n, "evidence": [...]}.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lrcompile.kernels import selector
from lrcompile.compile.machine import describe_key, machine_key

REFERENCE_PATH = Path(__file__).with_name("reference_calibration.json")
FILE_NAME = "calibration.json"
IMPLEMENTATIONS = ("c", "c-hybrid", "torch", "triton")


def cache_dir() -> Path:
    root = os.environ.get("LRCOMPILE_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lrcompile"
    return Path(root)


def fallback_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"lrcompile-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def user_path() -> Path:
    """Where this machine's calibrations are read from: the cache, or the fallback if only that has one."""
    if os.environ.get("LRCOMPILE_CALIBRATION"):
        return Path(os.environ["LRCOMPILE_CALIBRATION"])
    primary = cache_dir() / FILE_NAME
    fallback = fallback_dir() / FILE_NAME
    return fallback if not primary.exists() and fallback.exists() else primary


def writable_path() -> Path:
    """Where `lrcompile calibrate` writes: the cache if it can be created and written, else the fallback."""
    if os.environ.get("LRCOMPILE_CALIBRATION"):
        return Path(os.environ["LRCOMPILE_CALIBRATION"])
    for folder in (cache_dir(), fallback_dir()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            return folder / FILE_NAME
        except OSError:
            continue
    raise OSError(f"neither {cache_dir()} nor {fallback_dir()} can be written: set LRCOMPILE_CACHE_DIR")


_loaded: dict = {}


def read(path: Path) -> list[dict]:
    """The entries of a calibration file ([] if absent), re-read when the file changes."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return []
    # save() replaces the file, so a new inode marks a change even within one mtime tick
    stamp = (status.st_mtime_ns, status.st_ino, status.st_size)
    if _loaded.get(path, (None,))[0] != stamp:
        _loaded[path] = (stamp, json.loads(path.read_text()).get("calibrations", []))
    return _loaded[path][1]


def save(entry: dict, path: Path | None = None) -> Path:
    """Store `entry` in this machine's file, replacing any entry with the same key."""
    path = writable_path() if path is None else path
    entries = [e for e in read(path) if e["key"] != entry["key"]] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    about = "Cost-model calibrations measured on this machine by `lrcompile calibrate` (lrcompile.compile.calibration)."
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps({"about": about, "calibrations": entries}, indent=1) + "\n")
    temporary.replace(path)  # a process reading meanwhile sees the old file or the new, never half
    _loaded.pop(path, None)
    return path


def busy_cores(implementation: str, batch_heads: int, threads: int) -> float:
    """CPU cores the low-rank path keeps busy on average over a call of `batch_heads` problems.

    The C sweep ("c") runs one head per thread with single-threaded products: min(threads,
    batch_heads) cores, less when the last round of heads leaves some idle (batch_heads / rounds).
    The other paths split every product over all threads, as SDPA splits one head over all cores.
    """
    if implementation != "c" or threads <= 1:
        return float(max(threads, 1))
    rounds = math.ceil(batch_heads / threads)
    return batch_heads / rounds


@dataclass(frozen=True)
class Calibration:
    """One machine's measured rate ratios, as applied to calls on it."""

    key: dict
    non_causal: float
    causal: float
    shortest_crossover: int
    batch_heads: int
    measured_on: dict
    source: str  # which calibration this is, for the report
    evidence: tuple = ()  # the measured configurations: {"causal", "n" (crossover), ...}

    def shortest_crossover_for(self, causal: bool) -> int:
        """The shortest crossover measured for this mask kind (causal attention crosses later than
        non-causal: SDPA skips the masked half), else the shortest over all configurations."""
        measured = [entry["n"] for entry in self.evidence if entry.get("causal") == causal and entry.get("n")]
        return math.ceil(min(measured)) if measured else self.shortest_crossover

    def rate_ratio(self, causal: bool, batch_heads: int | None = None) -> float:
        """Low-rank FLOP rate / exact attention's near the crossover, for a call of `batch_heads`
        problems: the measured ratio, scaled by the cores the low-rank path keeps busy (exact
        attention uses all of them whatever the count)."""
        ratio = self.causal if causal else self.non_causal
        if batch_heads is None or self.key["device"] != "cpu":
            return ratio
        threads, implementation = self.key["threads"], self.key["implementation"]
        return ratio * busy_cores(implementation, batch_heads, threads) / busy_cores(
            implementation, self.batch_heads, threads)


@dataclass(frozen=True)
class Lookup:
    """The calibration that applies to a call, or None; either way `description` says which, or why none."""

    calibration: Calibration | None
    description: str


def implementation_for(device_type: str, batch_heads: int) -> str:
    """The calibration key's implementation for a call of `batch_heads` problems on `device_type`,
    as lrcompile.kernels.selector chooses it (LRCOMPILE_KERNELS included); d = 64, degree 2, float32: what
    `lrcompile calibrate` measures."""
    return key_implementation(selector.choose(device_type, torch.float32, 2, 64, 64, batch_heads))


def key_implementation(choice: selector.Choice) -> str:
    """"c" (the C sweep), "c-hybrid" (C feature maps around torch's sweep), "torch" or "triton":
    the paths that run at different speeds, so each needs its own calibration."""
    if choice.implementation == "c" and choice.sweep != "c":
        return "c-hybrid"
    return choice.implementation


def lookup(device_type: str, implementation: str) -> Lookup:
    """The calibration for this machine and `implementation`: this machine's own (newest file
    first), else the shipped reference's if this is the reference machine, else none, with why."""
    key = machine_key(device_type, implementation)
    for path, source in ((user_path(), "this machine's"), (REFERENCE_PATH, "the reference machine's")):
        for entry in reversed(read(path)):
            if entry["key"] == key:
                when = entry.get("measured_on", {}).get("date", "date unknown")
                described = f"{source} calibration, measured {when} ({path})"
                return Lookup(_calibration(entry, described), described)
    reference = [describe_key(entry["key"]) for entry in read(REFERENCE_PATH)]
    why = (f"no calibration for this machine and path ({describe_key(key)}): the shipped one is the reference "
           f"machine's ({'; '.join(reference) or 'none'}) and no `lrcompile calibrate` was run here "
           f"({user_path()})")
    return Lookup(None, why)


def _calibration(entry: dict, source: str) -> Calibration:
    return Calibration(key=entry["key"], non_causal=entry["non_causal"], causal=entry["causal"],
                       shortest_crossover=entry.get("shortest_crossover", 0), batch_heads=entry["batch_heads"],
                       measured_on=entry.get("measured_on", {}), source=source,
                       evidence=tuple(entry.get("evidence", ())))
