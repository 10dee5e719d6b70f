"""End to end: the real `sft` pipeline through the `kedro` CLI, on a copy of the project."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import project_copy as pc

pytestmark = pytest.mark.slow

# The end-to-end run's own budget, on top of project_copy's tiny environment (tiny llama, LoRA):
# 4 steps with a checkpoint every 2, 3 generated eval samples.
E2E_PARAMS = {
    "data": {"eval_fraction": 0.2},
    "training": {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3},
    "evaluation": {"max_samples": 3, "max_new_tokens": 8, "batch_size": 4},
}


def kedro(project: Path, *args: str) -> str:
    return pc.run([sys.executable, "-m", "kedro", *args, "--env", pc.TINY_ENV], project)


DATASETS = {
    "alpaca": ("llamafactory/alpaca_en_demo.json", {}),
    "messages": ("llamafactory/kto_en_demo.json", {}),
    "sharegpt": ("fastchat/data__dummy_conversation.json", {}),
    "gpteacher": ("gpteacher/codegen-instruct.json", {"response": "response"}),
}


def test_a_real_dataset_with_params_only(tmp_path, fixtures_dir):
    """Kedro's --params syntax: comma-separated dotted keys, a column mapping among them."""
    relpath, columns = DATASETS["gpteacher"]
    project = pc.make_project(tmp_path / "project")
    # Real data has a few bad records: let them be quarantined rather than fail the run.
    overrides = [f"data.path={fixtures_dir / 'datasets' / relpath}"]
    overrides += [f"data.columns.{ours}={theirs}" for ours, theirs in columns.items()]
    overrides.append("validation.max_rejected_fraction=0.5")
    kedro(
        project,
        "run",
        "--pipeline=sft",
        "--to-nodes=tokenize_conversations",
        "--params",
        ",".join(overrides),
    )
    stats = json.loads((project / "data/08_reporting/token_stats.json").read_text())
    assert stats["splits"]["train"]["rows_kept"] > 0
    report = json.loads((project / "data/08_reporting/validation_report.json").read_text())
    assert report["ingested"] == report["valid"] + report["rejected"]


def test_the_data_half_on_real_datasets_of_three_formats_mixed(tmp_path, fixtures_dir):
    """Alpaca, OpenAI messages and ShareGPT files as the sources of one mixture, each read in
    its own format: every source's records reach the tokens, and its counts reconcile."""
    names = ("alpaca", "messages", "sharegpt")
    project = pc.make_project(tmp_path / "project")
    sources = [
        {"name": name, "path": str(fixtures_dir / "datasets" / DATASETS[name][0])} for name in names
    ]
    pc.set_params(
        project,
        {"data": {"sources": sources}, "validation": {"max_rejected_fraction": 0.5}},
    )
    kedro(project, "run", "--pipeline=sft", "--to-nodes=tokenize_conversations")
    report = json.loads((project / "data/08_reporting/validation_report.json").read_text())
    assert set(report["sources"]) == set(names)
    for counts in report["sources"].values():
        assert counts["ingested"] == counts["valid"] + counts["rejected"] and counts["valid"]
    for key in ("ingested", "valid", "rejected"):
        assert sum(c[key] for c in report["sources"].values()) == report[key]
    texts = (project / "data/04_feature/train_texts.jsonl").read_text().splitlines()
    assert {json.loads(line)["source"] for line in texts} == set(names)
    stats = json.loads((project / "data/08_reporting/token_stats.json").read_text())
    assert stats["splits"]["train"]["rows_kept"] > 0
