"""notebooks/inspect_run.ipynb runs against a tiny run and shows what it promises."""

from __future__ import annotations

import os
import shutil

import nbformat
import pytest

from tests import project_copy as pc

NOTEBOOK = pc.PROJECT_ROOT / "notebooks" / "inspect_run.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source.strip() == "%load_ext kedro.ipython"
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes_against_a_tiny_run(tmp_path_factory, monkeypatch) -> None:
    from nbclient import NotebookClient

    root, _, _ = pc.reproduced_project(tmp_path_factory)
    pc.run(["dvc", "repro"], root)  # a complete, current run even after other tests' edits
    (root / "notebooks").mkdir(exist_ok=True)
    shutil.copy2(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    # The `python3` kernel spec starts `python` from PATH: make it this venv's.
    monkeypatch.setenv("PATH", f"{pc.VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "1")
    nb = nbformat.read(root / "notebooks" / NOTEBOOK.name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(root / "notebooks")}},
    )
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert len(images) == 2  # token lengths, training loss
    assert len(tables) >= 4  # metrics, token counts, rejected records, generations
    generations = next(o for o in tables if "tuned_output" in o["data"]["text/html"])
    assert "base_output" in generations["data"]["text/html"]
