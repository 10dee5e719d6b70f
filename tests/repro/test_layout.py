"""The package layout keeps its promises: folders by stage, imports pointing down the layers, no
import cycle between modules."""

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

# The folders from the bottom up: a module imports only from its own folder or one listed before
# it (the root modules, which Kedro and conf/ name, sit above them all).
LAYERS = (
    "common",
    "data",
    "model",
    "trainer",
    "repro",
    "finetune",
    "evaluation",
    "export",
    "run",
    "pipelines",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_by_name(node: ast.AST) -> bool:
    """`importlib.import_module("sft_pipeline...")`: an import all the same (a run hook loads
    the dvc.yaml check so, to keep it out of every stage's code deps)."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    first = node.args[0]
    return (
        name == "import_module"
        and isinstance(first, ast.Constant)
        and isinstance(first.value, str)
        and first.value.startswith("sft_pipeline.")
    )


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
            elif _imported_by_name(node):
                found.add(node.args[0].value)  # type: ignore[attr-defined]
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


def _layer(module: str) -> int:
    folder = module.split(".")[1] if "." in module else ""
    return LAYERS.index(folder) if folder in LAYERS else len(LAYERS)  # a root module: the top


def test_imports_point_down_the_layers() -> None:
    assert set(LAYERS) == FOLDERS
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _imports().items()
        for target in targets
        # The package itself runs before any of its modules: importing it points nowhere.
        if target != PACKAGE.name and _layer(target) > _layer(module)
    )
    assert upward == []


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
