"""The import-graph walk behind the run fingerprint starts from code objects and fails loudly."""

from __future__ import annotations

import pytest

from sft_pipeline.finetune import run_state
from sft_pipeline.repro.code_graph import CodeGraphError, package_files, package_graph


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
