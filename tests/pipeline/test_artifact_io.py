"""Kedro datasets: round trips in standard formats and atomic saves."""

import json

import pandas as pd
import pytest
from kedro.io import DatasetError

from sft_pipeline.artifact_io import (
    ArrowDataset,
    JSONDataset,
    JSONLinesDataset,
    ModelFolderDataset,
    ParquetDataset,
)
from sft_pipeline.common.atomic import atomic_path


def test_parquet_round_trip_and_deterministic_bytes(tmp_path):
    df = pd.DataFrame({"record_id": ["a", "b"], "source_row": [1, 2]})
    first, second = (
        ParquetDataset(str(tmp_path / "a.parquet")),
        ParquetDataset(str(tmp_path / "b.parquet")),
    )
    first.save(df)
    second.save(df)
    pd.testing.assert_frame_equal(first.load(), df, check_dtype=False)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_jsonlines_keeps_unicode_readable(tmp_path):
    ds = JSONLinesDataset(str(tmp_path / "x.jsonl"))
    rows = [{"text": "café ☕"}, {"text": "second"}]
    ds.save(rows)
    assert ds.load() == rows
    assert "café ☕" in (tmp_path / "x.jsonl").read_text(encoding="utf-8")


def test_json_sorted_and_stable(tmp_path):
    ds = JSONDataset(str(tmp_path / "m.json"))
    ds.save({"b": 1, "a": 2})
    assert list(json.loads((tmp_path / "m.json").read_text())) == ["a", "b"]


def test_arrow_round_trip(tmp_path):
    import datasets

    ds = ArrowDataset(str(tmp_path / "tokens"))
    ds.save(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]}))
    assert ds.load()["labels"] == [[-100, 2, 3]]


class _Saver:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, path):
        (path / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("interrupted")


def test_interrupted_folder_save_keeps_previous_artifact(tmp_path):
    ds = ModelFolderDataset(str(tmp_path / "model"))
    ds.save(_Saver())
    with pytest.raises(DatasetError, match="interrupted"):
        ds.save(_Saver(fail=True))
    assert ds.load() == tmp_path / "model"
    # Only the complete artifact remains: no temporary siblings left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_interrupted_file_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="missing or empty"):
        ModelFolderDataset(str(tmp_path / "nope")).load()
