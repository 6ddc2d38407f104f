#!/usr/bin/env python3
"""The two quick-start commands, on a machine with nothing but Python:

    python3 dev.py demo    # the main job: compile a model with lrcompile, print sites, error, speed
    python3 dev.py test    # the layer contracts (lint-imports), then the whole test suite

Each creates (or reuses) the virtual environment .venv beside this file and installs the project
into it, once per change of pyproject.toml. Extra arguments go to the demo or to pytest.
"""

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# Pinned here, not in pyproject.toml: this resolves to a local CPU wheel, while an unpinned torch
# would pull a multi-GB CUDA build. The package itself accepts a range.
TORCH = "torch==2.13.0"
# The transformers release the suite is run against (the dev extra accepts a range, README
# "Tested with" gives the oldest and newest tried); pinned so a new release cannot change a CI run.
TRANSFORMERS = "transformers==5.25.0"
PYTEST_NO_TESTS = 5


def ensure_environment() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".lrcompile-installed"
    pins = [TORCH, TRANSFORMERS]
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + " ".join(pins).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"installing {TORCH}, then lrcompile[dev,bench] with {TRANSFORMERS}, into {VENV}: about three "
              f"minutes the first time, seconds after that (pip's progress follows)", flush=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "on"]
        subprocess.run(pip + [TORCH], check=True)
        subprocess.run(pip + ["-e", f"{ROOT}[dev,bench]", *pins], check=True, cwd=ROOT)
        stamp.write_text(wanted)
        print(f"installed; later runs reuse {VENV} until pyproject.toml changes", flush=True)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    python = ensure_environment()
    command, args = argv[0], argv[1:]
    if command == "demo":
        return subprocess.run([str(python), "-m", "lrcompile.demo", *args], cwd=ROOT).returncode
    # The layers (pyproject.toml [tool.importlinter]) first: a broken contract fails the run.
    layers = subprocess.run([str(VENV / "bin" / "lint-imports")], cwd=ROOT).returncode
    if layers:
        print("dev.py: lint-imports found an import that breaks the layers; see the contracts above", file=sys.stderr)
        return layers
    code = subprocess.run([str(python), "-m", "pytest", *args], cwd=ROOT).returncode
    if code == PYTEST_NO_TESTS:
        print("dev.py: pytest collected no tests; that is a failure, not a pass", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
