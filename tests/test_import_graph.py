"""The import graph of the project's own packages: no cycle, and the dependency directions of
DESIGN §1 (service/ never imports training/; models/ neither; no library package imports the CLI).
The artifact contract (service/contract/) stands alone: it imports no torch and nothing outside
itself, and only service/contract/layout.py spells an artifact file name.

Every `import` statement counts, those inside functions too (a lazy import still ties two
modules together), read from the source with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "models", "training", "recsys_cli", "recsys_client")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _targets(name: str, path: Path) -> set[str]:
    """The project modules `name` imports (a `from pkg import mod` counts as pkg.mod)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return {t for t in out if t in MODULES and t != name}


GRAPH = {name: _targets(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    assert len(MODULES) > 50
    assert "service.artifacts" in GRAPH["service.pipeline"]  # a known edge
    assert "recsys_cli.main" in GRAPH["recsys_cli.commands.demo"]  # a function-level import counts


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize(("pkg", "forbidden"), [
    ("service", ("training", "models", "recsys_cli")),
    ("models", ("training", "service", "recsys_cli")),
    ("training", ("recsys_cli",)),
    # the Python client ships to the API's callers: it needs nothing of the server side
    ("recsys_client", ("service", "models", "training", "recsys_cli")),
    ("service", ("recsys_client",)),
])
def test_dependency_direction(pkg: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.split(".")[0] == pkg
                 for t in targets if t.split(".")[0] in forbidden)
    assert bad == []


def test_recsys_serve_reaches_only_the_cli_and_service() -> None:
    """What `recsys serve` can import, lazily or not: the CLI's main, the serve command and service/."""
    seen, todo = set(), ["recsys_cli.main", "recsys_cli.commands.serve"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(GRAPH[m])
    assert {m.split(".")[0] for m in seen} == {"recsys_cli", "service"}
    assert not {m for m in seen if m.startswith("recsys_cli.")} - {
        "recsys_cli", "recsys_cli.main", "recsys_cli.errors", "recsys_cli.commands", "recsys_cli.commands.serve"}


@pytest.mark.parametrize("module", ["training.eval.served_eval", "training.eval.metrics", "service.contract.features",
                                    "service.contract.manifest", "service.contract.layout"])
def test_numpy_side_modules_import_no_torch(module: str) -> None:
    """The served-path evaluation and the metrics it uses run without torch (imported, not just read)."""
    import subprocess
    import sys

    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


# --- the artifact contract (service/contract/) ---

CONTRACT = "service.contract"


def _external(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (torch, numpy, training, ...)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_contract_imports_no_torch_and_nothing_outside_itself() -> None:
    contract = [m for m in MODULES if m == CONTRACT or m.startswith(CONTRACT + ".")]
    assert f"{CONTRACT}.layout" in contract and f"{CONTRACT}.manifest" in contract
    outside = sorted(f"{m} -> {t}" for m in contract for t in GRAPH[m] if not t.startswith(CONTRACT))
    assert outside == []  # so nothing reachable from it can bring torch, training or models in
    banned = sorted(f"{m} imports {x}" for m in contract for x in _external(MODULES[m])
                    if x in ("torch", "training", "models", "recsys_cli"))
    assert banned == []


def _file_names() -> dict[str, str]:
    """name -> constant: every string constant service/contract/layout.py defines at module level."""
    tree = ast.parse((ROOT / "service" / "contract" / "layout.py").read_text())
    return {node.value.value: t.id for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for t in node.targets if isinstance(t, ast.Name)}


def _spelled(source: str, names: dict[str, str]) -> list[tuple[int, str]]:
    """(line, name) of each string constant in `source` that is an artifact file name, or a path
    ending in one ("a/manifest.json"); docstrings do not count (comments are not in the AST)."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return sorted((n.lineno, n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
                  and (n.value in names or n.value.rsplit("/", 1)[-1] in names and "/" in n.value))


def test_the_file_name_scan_finds_a_planted_literal() -> None:
    names = _file_names()
    assert names["manifest.json"] == "MANIFEST" and names["CURRENT"] == "CURRENT" and len(names) > 15
    planted = ('"""Reads manifest.json (a docstring: allowed)."""\n'
               '# manifest.json in a comment: allowed\n'
               'def f(folder):\n'
               '    """manifest.json in a function docstring: allowed."""\n'
               '    return folder / "manifest.json", f"{folder}/CURRENT", "manifest.json has no rows"\n')
    assert _spelled(planted, names) == [(5, "/CURRENT"), (5, "manifest.json")]


def test_only_layout_spells_an_artifact_file_name() -> None:
    names = _file_names()
    found = sorted((path.relative_to(ROOT).as_posix(), line, name)
                   for pkg in ("service", "training", "recsys_cli") for path in (ROOT / pkg).rglob("*.py")
                   if path != ROOT / "service" / "contract" / "layout.py"
                   for line, name in _spelled(path.read_text(), names))
    assert found == []
