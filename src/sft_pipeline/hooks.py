"""Kedro hooks of the project (registered in `settings.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

# Dataset name -> file path of this run's catalog, for messages that point at an artifact.
_ARTIFACT_PATHS: dict[str, str] = {}


def artifact_path(name: str) -> str:
    """The file of catalog dataset `name` in this run (the catalog holds the path, not code)."""
    return _ARTIFACT_PATHS.get(name, f"the `{name}` dataset")


class ArtifactPaths:
    """Remembers the file path of every catalog dataset when the catalog is created."""

    @hook_impl
    def after_catalog_created(self, catalog: Any) -> None:
        _ARTIFACT_PATHS.clear()
        for name in catalog:
            filepath = getattr(catalog.get(name), "_filepath", None)
            if filepath is not None:
                _ARTIFACT_PATHS[name] = Path(filepath).as_posix()
