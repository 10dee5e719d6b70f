"""The package layout keeps its promises: folders by stage, no import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "sft_pipeline"
# What Kedro, pyproject.toml or conf/ name by path stays at the package root.
ROOT_MODULES = {
    "__init__.py",
    "__main__.py",
    "settings.py",
    "pipeline_registry.py",
    "cli.py",
    "artifact_io.py",
}
FOLDERS = {
    "common",
    "data",
    "model",
    "trainer",
    "finetune",
    "evaluation",
    "export",
    "repro",
    "run",
    "pipelines",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Project module -> project modules it imports anywhere in its source."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sft_pipeline"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("sft_pipeline.")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_package_root_holds_only_what_kedro_and_conf_name_by_path() -> None:
    files = {p.name for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert files == ROOT_MODULES
    assert folders == FOLDERS


def test_tests_mirror_the_package_folders() -> None:
    tests = Path(__file__).resolve().parents[1]
    mirrored = {p.name for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert FOLDERS - {"pipelines"} <= mirrored


def test_no_import_cycle_between_modules() -> None:
    graph = _imports()
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_data_half_never_imports_torch() -> None:
    for path in (PACKAGE / "data").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path.name
