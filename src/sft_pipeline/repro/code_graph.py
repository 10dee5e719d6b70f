"""Which source files of the project package a piece of code can execute: an import-graph walk.

Two consumers need the same answer and ask here: `dvc_stages` (a stage's code deps, so editing a
module re-runs exactly the nodes whose code imports it) and the training run fingerprint
(`finetune.run_state.code_fingerprint`, so a checkpoint of older training code is not resumed).
The walk is static (`ast`), conservative inside a module (an import inside any function counts)
and skips `if TYPE_CHECKING:` blocks.

Parsing is most of its cost. A graph given a cache file keeps each module's import statements
there under the sha256 of the module's bytes, so the next walk (the next DVC stage's check of
`dvc.yaml`) parses only what changed: the answer depends on the sources' content alone, never on
file times.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


class CodeGraphError(ValueError):
    """The source of a function to walk from cannot be found."""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


# The fields of a node that hold statements: an import is a statement, so the walk never needs to
# enter an expression (most of a module's nodes).
_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def _import_nodes(tree: ast.AST, *, into_functions: bool) -> Iterable[ast.Import | ast.ImportFrom]:
    """Import statements that can execute: `if TYPE_CHECKING:` bodies never do.

    With into_functions=False, only statements that run when the module is imported.
    """
    stack = [tree]
    while stack:
        current = stack.pop()
        for name in _BLOCKS:
            block = getattr(current, name, None)
            for child in block if isinstance(block, list) else ():
                if isinstance(child, ast.Import | ast.ImportFrom):
                    yield child
                elif isinstance(child, ast.If) and _is_type_checking(child.test):
                    stack.append(ast.Module(body=child.orelse, type_ignores=[]))
                elif not into_functions and isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef
                ):
                    continue
                else:
                    stack.append(child)


class CodeGraph:
    """Resolves which source files of one package a piece of code can execute."""

    def __init__(self, source_dir: Path, package: str, cache: Path | None = None) -> None:
        self.source_dir = source_dir
        self.package = package
        # sha256 of a module's bytes -> its import statements (`_encode`), read from and written
        # back to `cache` (only the modules of this walk: the file never grows stale entries).
        self._cache = cache
        self._stored = _read_cache(cache)
        self._used: dict[str, dict[str, list]] = {}
        # One graph answers for one state of the sources (a `kedro dvc generate`, a stage's
        # check, a fingerprint): each file is found, parsed and walked once, not once per node.
        self._trees: dict[Path, ast.Module] = {}
        self._files: dict[str, Path | None] = {}
        self._imports: dict[tuple[str, bool], dict[str, bool]] = {}

    def module_file(self, module: str) -> Path | None:
        if module not in self._files:
            base = self.source_dir.joinpath(*module.split("."))
            candidates = (base.with_suffix(".py"), base / "__init__.py")
            self._files[module] = next((c for c in candidates if c.is_file()), None)
        return self._files[module]

    def _tree(self, path: Path) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        return self._trees[path]

    def _in_package(self, module: str) -> bool:
        return module == self.package or module.startswith(self.package + ".")

    def is_wiring(self, module: str) -> bool:
        """Pipeline declarations: what they change is the wiring, which dvc.yaml itself encodes.

        Following them would make every node depend on every node module's imports.
        """
        wiring = (f"{self.package}.pipelines", f"{self.package}.pipeline_registry")
        return any(module == w or module.startswith(w + ".") for w in wiring)

    def _resolve(
        self, stmt: ast.Import | ast.ImportFrom, current: str, is_pkg: bool
    ) -> dict[str, bool]:
        """Project modules an import statement runs -> whether all of its code may run.

        The named module (or, for `from pkg import attr`, the package) may have any function
        called; its parent packages only run their top level (`import a.b.c` runs a/__init__
        and a/b/__init__ first).
        """
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        else:
            if stmt.level:
                parts = current.split(".")
                keep = len(parts) - stmt.level + (1 if is_pkg else 0)
                base = ".".join([*parts[:keep], *([stmt.module] if stmt.module else [])])
            else:
                base = stmt.module or ""
            names = []
            for alias in stmt.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if self.module_file(sub) else base)
        found: dict[str, bool] = {}
        for name in names:
            if not self._in_package(name):
                continue
            parts = name.split(".")
            for i in range(1, len(parts)):
                found.setdefault(".".join(parts[:i]), False)
            found[name] = True
        return {m: full for m, full in found.items() if self.module_file(m)}

    def imports_of(self, module: str, *, into_functions: bool) -> dict[str, bool]:
        key = (module, into_functions)
        if key not in self._imports:
            path = self.module_file(module)
            found: dict[str, bool] = {}
            if path is not None:
                is_pkg = path.name == "__init__.py"
                for stmt in self._statements(path, into_functions):
                    for dep, full in self._resolve(stmt, module, is_pkg).items():
                        found[dep] = found.get(dep, False) or full
            self._imports[key] = found
        return dict(self._imports[key])

    def _statements(self, path: Path, into_functions: bool) -> list[ast.Import | ast.ImportFrom]:
        """`_import_nodes` of a module, from the cache when its bytes are known there."""
        if self._cache is None:
            return list(_import_nodes(self._tree(path), into_functions=into_functions))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entry = self._used.get(digest) or self._stored.get(digest)
        if entry is None:
            tree = self._tree(path)
            entry = {
                key: [_encode(stmt) for stmt in _import_nodes(tree, into_functions=full)]
                for key, full in (("all", True), ("top", False))
            }
        self._used[digest] = entry
        return [_decode(item) for item in entry["all" if into_functions else "top"]]

    def save_cache(self) -> None:
        """Write the import statements of the modules walked so far to the cache file."""
        if self._cache is None or self._used == self._stored:
            return
        from sft_pipeline.common.atomic import write_text

        try:
            self._cache.parent.mkdir(parents=True, exist_ok=True)
            write_text(self._cache, json.dumps(self._used, sort_keys=True))
        except OSError:
            pass  # a read-only checkout: the next walk parses again, with the same answer

    def closure(self, modules: Mapping[str, bool]) -> set[str]:
        """Modules reachable from `modules` (module -> whether all of its code may run).

        Conservative inside a library module: any of its functions may be called, so an import
        inside any function counts. A package `__init__` that only runs because a submodule is
        imported contributes its top-level imports only.
        """
        full_done: set[str] = set()
        top_done: set[str] = set()
        todo = [(m, full) for m, full in modules.items() if not self.is_wiring(m)]
        while todo:
            module, full = todo.pop()
            if module in full_done or (not full and module in top_done):
                continue
            (full_done if full else top_done).add(module)
            for dep, dep_full in self.imports_of(module, into_functions=full).items():
                if not self.is_wiring(dep):
                    todo.append((dep, dep_full))
        return full_done | top_done

    def function_imports(self, func: Callable[..., Any]) -> dict[str, bool]:
        """Project modules a node function can run: its module's top level, its own body and
        the bodies of same-module functions it calls by name."""
        module = func.__module__
        path = self.module_file(module)
        if path is None:
            raise CodeGraphError(
                f"cannot find the source of {module} under {self.source_dir} (node function "
                f"{getattr(func, '__qualname__', func)!r})"
            )
        tree = self._tree(path)
        is_pkg = path.name == "__init__.py"
        found = self.imports_of(module, into_functions=False)
        functions = {
            n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        name = getattr(func, "__name__", "")
        if name not in functions:
            # Not a plain module-level function (a partial, a lambda): any code may run.
            return self.imports_of(module, into_functions=True)
        todo, visited = [name], set()
        while todo:
            current = todo.pop()
            if current in visited:
                continue
            visited.add(current)
            for stmt in _import_nodes(functions[current], into_functions=True):
                for dep, full in self._resolve(stmt, module, is_pkg).items():
                    found[dep] = found.get(dep, False) or full
            called = {n.id for n in ast.walk(functions[current]) if isinstance(n, ast.Name)}
            todo.extend(called & functions.keys())
        return found

    def files(self, modules: Iterable[str]) -> set[Path]:
        return {p for m in modules if (p := self.module_file(m)) is not None}


def _encode(stmt: ast.Import | ast.ImportFrom) -> list:
    names = [alias.name for alias in stmt.names]
    if isinstance(stmt, ast.Import):
        return [names]
    return [names, stmt.module, stmt.level]


def _decode(item: list) -> ast.Import | ast.ImportFrom:
    aliases = [ast.alias(name=name) for name in item[0]]
    if len(item) == 1:
        return ast.Import(names=aliases)
    return ast.ImportFrom(module=item[1], names=aliases, level=item[2])


def _read_cache(path: Path | None) -> dict[str, dict[str, list]]:
    """The cache file's entries; a missing or unreadable file is an empty cache."""
    if path is None:
        return {}
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def node_modules(graph: CodeGraph, func: Callable[..., Any]) -> set[str]:
    """Project modules a node's function can run (its own module included)."""
    return graph.closure(graph.function_imports(func)) | {func.__module__}


def package_graph() -> CodeGraph:
    """The graph of this installed package (editable or not)."""
    import sft_pipeline

    package_dir = Path(sft_pipeline.__file__).resolve().parent
    return CodeGraph(package_dir.parent, package_dir.name)


def package_files(package: str) -> list[Path]:
    """Source files the modules of `package` (a folder of this project) can run, sorted."""
    graph = package_graph()
    init = graph.module_file(package)
    if init is None or init.name != "__init__.py":
        raise CodeGraphError(f"no package {package} under {graph.source_dir}")
    members = {f"{package}.{p.stem}": True for p in init.parent.glob("*.py") if p != init}
    return sorted(graph.files(graph.closure({package: True, **members})))
