"""The package's architecture: no import cycles, and the layers of docs/design.md section 7 as import-linter checks them.

The import graph is read from the source with ast, every import statement counted wherever it
stands (inside functions and `if TYPE_CHECKING:` blocks too): an import deferred into a function
still makes two modules depend on each other. `from lrcompile import x` is an edge to the module
lrcompile.x where that is a module, else to the package lrcompile (whose __init__ imports the
public API, so a layer that imports it depends on every layer).
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["cli | demo", "bench", "compile", "ops", "kernels", "math"]  # docs/design.md section 7, top to bottom


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> nx.DiGraph:
    """Modules of `package` (a directory) and the imports between them."""
    root = package.parent
    files = {module_name(path, root): path for path in sorted(package.rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, importer, is_package):
                resolved = _resolve(target, files)
                if resolved is not None and resolved != importer:
                    graph.add_edge(importer, resolved, line=node.lineno)
    return graph


def _targets(node, importer: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        return [f"{base}.{alias.name}" for alias in node.names]
    return []


def _resolve(target: str, modules) -> str | None:
    """The module of the package that `target` names: itself, or its longest prefix that is one."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in modules:
            return name
    return None


def cycle_message(graph: nx.DiGraph) -> str:
    """'' when the graph is acyclic; else one cycle, edge by edge with the line of each import."""
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return ""
    steps = [f"  {a} (line {graph.edges[a, b]['line']}) -> {b}" for a, b in cycle]
    return "import cycle:\n" + "\n".join(steps)


@pytest.mark.parametrize("package", ["lrcompile", "passes"])
def test_no_module_imports_itself_back_through_others(package):
    graph = import_graph(ROOT / package)
    assert graph.number_of_edges() > 10, "the graph was not read: no imports found"
    message = cycle_message(graph)
    assert not message, message


def test_a_cycle_through_a_function_level_import_is_found_and_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "top.py").write_text("from pkg.low import base\n")
    (package / "low" / "base.py").write_text("def late():\n    from pkg import top\n    return top\n")
    message = cycle_message(import_graph(package))
    assert "pkg.top (line 1) -> pkg.low.base" in message and "pkg.low.base (line 2) -> pkg.top" in message


def test_the_layer_contract_is_the_documented_order():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) == {"lrcompile", "passes"}
    contracts = {c["name"]: c for c in config["contracts"]}
    layers = [c for c in contracts.values() if c["type"] == "layers" and c.get("containers") == ["lrcompile"]]
    assert [c["layers"] for c in layers] == [LAYERS]
    passes = [c for c in contracts.values() if c.get("source_modules") == ["passes"]]
    assert passes and passes[0]["type"] == "forbidden" and passes[0]["forbidden_modules"] == ["lrcompile"]


def test_every_import_linter_contract_is_kept():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extras (pip install -e .[dev])")
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
