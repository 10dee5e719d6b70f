"""The import-graph walk behind the run fingerprint and dvc.yaml starts from code objects, fails
loudly, and parses again only what changed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sft_pipeline.finetune import run_state
from sft_pipeline.repro.code_graph import CodeGraph, CodeGraphError, package_files, package_graph


def test_the_walk_refuses_a_package_that_does_not_exist() -> None:
    with pytest.raises(CodeGraphError, match=r"sft_pipeline\.renamed_away"):
        package_files("sft_pipeline.renamed_away")


def test_the_fingerprinted_training_code_includes_the_workflow_and_the_trainer() -> None:
    root = package_graph().source_dir
    # The fingerprint walks from the package of run_state itself: the training recipe.
    files = {p.relative_to(root).as_posix() for p in package_files(run_state.__package__)}
    assert {
        "sft_pipeline/finetune/workflow.py",
        "sft_pipeline/finetune/run_state.py",
        "sft_pipeline/finetune/worker.py",
        "sft_pipeline/trainer/sft_trainer.py",
        "sft_pipeline/trainer/loss.py",
        "sft_pipeline/model/device.py",
    } <= files
    # Merging, export and evaluation never run inside training.
    elsewhere = ("sft_pipeline/export/", "sft_pipeline/evaluation/")
    assert not any(f.startswith(elsewhere) for f in files)


def _write_package(root: Path, beta: str) -> None:
    (root / "fakepkg").mkdir(exist_ok=True)
    (root / "fakepkg" / "__init__.py").write_text("")
    (root / "fakepkg" / "alpha.py").write_text("from fakepkg import beta\n")
    (root / "fakepkg" / "beta.py").write_text(beta)
    (root / "fakepkg" / "gamma.py").write_text("")


def test_a_cached_walk_answers_as_a_fresh_one_and_parses_only_changed_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "state" / "imports.json"
    _write_package(tmp_path, "")
    first = CodeGraph(tmp_path, "fakepkg", cache)
    assert first.closure({"fakepkg.alpha": True}) == {"fakepkg", "fakepkg.alpha", "fakepkg.beta"}
    first.save_cache()
    # beta now imports gamma inside a function: only beta is parsed again, and the answer moves.
    _write_package(tmp_path, "def f():\n    from fakepkg import gamma\n")
    parsed: list[str] = []
    real_parse = ast.parse
    monkeypatch.setattr(
        ast,
        "parse",
        lambda src, filename, **kw: parsed.append(filename) or real_parse(src, filename, **kw),
    )
    cached = CodeGraph(tmp_path, "fakepkg", cache)
    fresh = CodeGraph(tmp_path, "fakepkg")
    walked = cached.closure({"fakepkg.alpha": True})
    assert [Path(p).name for p in parsed] == ["beta.py"]
    assert (
        walked
        == fresh.closure({"fakepkg.alpha": True})
        == {
            "fakepkg",
            "fakepkg.alpha",
            "fakepkg.beta",
            "fakepkg.gamma",
        }
    )
