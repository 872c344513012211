"""No import cycle inside speedpipe: every import statement, at module level or inside a function, is an edge.

An import inside a function hides a cycle from Python but not from a reader; the leaf modules (speedpipe.errors,
speedpipe.experiment_schema, speedpipe.launcher_settings) exist so that none is needed.
"""
import ast
import shutil
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path) -> dict[str, set[str]]:
    """module -> the speedpipe modules it imports (a `from package import name` counts the submodule when `name` is
    one, else the package)."""
    modules = {module_name(p, src): p for p in (src / "speedpipe").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle_inside_speedpipe():
    assert cycles(import_graph(SRC)) == []


def test_an_import_inside_a_function_that_closes_a_cycle_is_found(tmp_path):
    """The check itself, on a copy of src/ with one cycle injected the way they hide: a function-level import."""
    shutil.copytree(SRC / "speedpipe", tmp_path / "speedpipe", ignore=shutil.ignore_patterns("__pycache__"))
    errors = tmp_path / "speedpipe" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _hidden():\n    from speedpipe.config import load_config\n")
    found = cycles(import_graph(tmp_path))
    assert any({"speedpipe.errors", "speedpipe.config"} <= set(component) for component in found), found


def test_no_source_module_is_over_400_lines():
    """A module a reader holds in their head: one idea each (the DiT file, the loop, the experiment's jobs)."""
    long = {str(p.relative_to(SRC)): n for p in (SRC / "speedpipe").rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
