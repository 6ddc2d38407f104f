"""README.md and docs/: every link stays inside the repository and resolves, and every command
works as written right after the two quick-start commands (which create .venv/)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
VENV_PREFIXES = (".venv/bin/python ", ".venv/bin/lrcompile ")


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def links(path: Path) -> list[str]:
    return LINK.findall(path.read_text())


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(document):
    assert links(document) or document.name != "README.md"
    for target in links(document):
        assert "://" not in target and not target.startswith("mailto:"), f"{document.name} links outside: {target}"
        file, _, anchor = target.partition("#")
        resolved = (document.parent / file).resolve() if file else document
        assert resolved.is_relative_to(ROOT), f"{document.name}: {target} leaves the repository"
        assert resolved.exists(), f"{document.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in heading_anchors(resolved), f"{document.name}: no heading #{anchor} in {file or 'itself'}"


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = ("../shared", "DESIGN.md", "DESIGN section", "DESIGN §")  # the design is docs/design.md
    offenders = [name for name in tracked if name.endswith((".py", ".md", ".toml", ".c", ".h"))
                 and name != "tests/test_readme.py"
                 and any(word in (ROOT / name).read_text(errors="replace") for word in outside)]
    assert offenders == []


def readme_commands() -> list[str]:
    """Every command line of README's shell blocks, continuation lines joined, comments dropped."""
    commands = []
    for language, body in FENCE.findall((ROOT / "README.md").read_text()):
        if language not in ("bash", "sh", "shell"):
            continue
        for command in body.replace("\\\n", " ").splitlines():
            command = command.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_runs_in_the_environment_the_quick_start_makes():
    commands = readme_commands()
    assert any(command.startswith("python3 dev.py test") for command in commands)
    for command in commands:
        assert command.startswith(("python3 dev.py ", *VENV_PREFIXES)), (
            f"{command!r} would need an activated environment; write it as .venv/bin/python or .venv/bin/lrcompile")
        words = shlex.split(command)
        if words[0] == ".venv/bin/python" or words[:2] == ["python3", "dev.py"]:
            assert (ROOT / words[1]).is_file(), f"{command!r}: no file {words[1]}"


def help_commands() -> list[list[str]]:
    """One `--help` call per distinct script or lrcompile subcommand the README runs."""
    distinct = {}
    for command in readme_commands():
        words = shlex.split(command)
        if words[0] == ".venv/bin/python":
            distinct[words[1]] = [sys.executable, words[1], "--help"]
        elif words[0] == ".venv/bin/lrcompile":
            distinct[f"lrcompile {words[1]}"] = [sys.executable, "-m", "lrcompile.cli", words[1], "--help"]
    return sorted(distinct.values())


@pytest.mark.slow
@pytest.mark.parametrize("command", help_commands(), ids=lambda c: " ".join(c[1:-1]))
def test_every_script_and_subcommand_the_readme_runs_starts_and_takes_its_arguments(command):
    """A script that fails to import, or a subcommand that no longer exists, fails here; the
    commands themselves run in tests/test_examples.py, test_cli.py and test_benchmark_scripts.py."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "usage" in result.stdout.lower(), result.stderr[-2000:]
