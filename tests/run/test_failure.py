"""A mistake the user can fix ends `kedro run` with one short block and exit code 1."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sft_pipeline.common.errors import InputFileError
from sft_pipeline.run import failure
from tests import project_copy as pc


def test_the_user_error_is_found_behind_wrapping_exceptions() -> None:
    cause = InputFileError("data/x.jsonl", "invalid JSON", line=3)
    try:
        try:
            raise cause
        except InputFileError as exc:
            raise RuntimeError("a library wrapped it") from exc
    except RuntimeError as wrapped:
        assert failure.user_error(wrapped) is cause
    assert failure.user_error(KeyError("a bug")) is None


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = pc.make_project(tmp_path_factory.mktemp("failure") / "project", with_model=False)
    with (root / pc.RAW_DATA).open("a", encoding="utf-8") as f:
        f.write('{"instruction": "broken\n')
    return root


def kedro_run(root: Path, *args: str) -> tuple[int, str]:
    command = ["kedro", "run", "--pipelines=sft", "--env", pc.TINY_ENV, *args]
    proc = subprocess.run(
        command, cwd=root, env=pc.env(), capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_a_broken_input_line_ends_in_one_block_without_a_traceback(project: Path) -> None:
    code, output = kedro_run(project, "--nodes=ingest_records")
    assert code == 1
    assert "Traceback" not in output and "─ locals ─" not in output
    assert "Error: data/01_raw/demo_sft.jsonl, line 17" in output
    assert "invalid JSON" in output and "expected one JSON object per line" in output
    log_file = project / failure.ERROR_LOG
    assert "Traceback" in log_file.read_text(encoding="utf-8")
    assert str(failure.ERROR_LOG) in output


def test_traceback_flag_prints_the_traceback_too(project: Path) -> None:
    code, output = kedro_run(project, "--nodes=ingest_records", "--traceback")
    assert code == 1
    assert "Traceback" in output and "read_jsonl" in output


def test_a_bad_parameter_ends_in_one_block_naming_the_key(project: Path) -> None:
    code, output = kedro_run(project, "--nodes=ingest_records", "--params", "trainig.max_steps=1")
    assert code == 1
    assert "Traceback" not in output
    assert "trainig" in output and "training" in output


@pytest.mark.slow
def test_a_length_that_leaves_no_training_row_ends_in_one_block_naming_the_key(tmp_path) -> None:
    root = pc.make_project(tmp_path / "project")
    pc.set_params(root, {"tokenization": {"max_seq_length": 8}})
    code, output = kedro_run(root, "--to-nodes=train_adapter")
    assert code == 1
    assert "Traceback" not in output and "─ locals ─" not in output
    assert "Error: train_tokens holds no row to train on" in output
    assert "tokenization.max_seq_length" in output
    # What explains it was saved before the run stopped.
    train = pc.read_json(root, "data/08_reporting/token_stats.json")["splits"]["train"]
    assert train["rows_kept"] == 0
