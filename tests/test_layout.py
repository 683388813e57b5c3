"""The layout's rules, read from the source (no imports run): imports go one way and never in a
circle, and ``jax.jit`` lives in one module.

Every ``import`` statement of ``jax_realtime/`` and ``server/`` counts, also those inside functions
(a deferred import hides a circle, it does not remove it), except those under ``if TYPE_CHECKING:``
(they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("jax_realtime", "server")


def _modules() -> dict[str, Path]:
    return {f"{package}.{path.stem}": path for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))
            if path.stem != "__init__"}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports."""
    package = module.split(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (package if node.level else "") + (("." + node.module) if node.level and node.module
                                                      else node.module or "")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known and name != module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_the_graph_is_read():
    graph = _graph()
    assert "jax_realtime.engine" in graph["jax_realtime.transcribe"]
    assert "server.service" in graph["server.connection"]
    assert "server.realtime" in graph["server.app"]


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_library_never_imports_the_server():
    graph = _graph()
    assert not {(a, b) for a, deps in graph.items() for b in deps
                if a.startswith("jax_realtime.") and b.startswith("server.")}


def test_jit_in_one_module():
    users = sorted(name for name, path in _modules().items()
                   if "jax.jit(" in path.read_text() or "@jax.jit" in path.read_text())
    assert users == ["jax_realtime.engine"], users


def test_the_product_never_imports_the_harness():
    """Tests and scripts import the product and ``tests/harness``; the product imports neither."""
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        roots |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and not node.level}
        assert not roots & {"harness", "tests", "conftest", "realtime_client"}, (name, roots)


def test_the_readme_layout_names_every_module():
    """The README's Layout map names every module of the product and of the harness."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    files = [path for package in (*PACKAGES, "tests/harness") for path in sorted((ROOT / package).glob("*.py"))
             if path.stem != "__init__"]
    missing = [str(path.relative_to(ROOT)) for path in files if path.name not in layout]
    assert not missing, missing
