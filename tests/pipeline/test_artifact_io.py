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


def test_previews_name_images_by_path_and_hash_and_pixels_by_shape(tmp_path):
    # kedro-viz tables of records, rendered texts and tokens with images: no image bytes or
    # pixel values inlined, each image shown by its path (or "in the dataset") and hash.
    import base64

    from datasets import Dataset, Features, Sequence, Value

    embedded = base64.b64encode(b"\x89PNG" + bytes(4000)).decode("ascii")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": "data/01_raw/img/1.jpg", "sha256": "9f2c" + "0" * 60},
                {"type": "image", "bytes": embedded, "sha256": "ab12" + "1" * 60},
                {"type": "text", "text": "Who?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Kane."}]},
    ]
    records = ParquetDataset(str(tmp_path / "records.parquet"))
    records.save(pd.DataFrame({"record_id": ["r1"], "messages": [json.dumps(messages)]}))
    cell = json.dumps(records.preview()["data"][0][1])
    assert "<image data/01_raw/img/1.jpg sha256:9f2c00000000>" in cell
    assert "<image (in the dataset) sha256:ab1211111111>" in cell
    assert embedded[:40] not in cell and "Who?" in cell

    texts = JSONLinesDataset(str(tmp_path / "texts.jsonl"))
    texts.save([{"record_id": "r1", "images": [{"bytes": embedded, "sha256": "ab12" + "1" * 60}]}])
    assert texts.preview()["data"][0][1] == '["<image (in the dataset) sha256:ab1211111111>"]'

    tokens = ArrowDataset(str(tmp_path / "tokens"))
    tokens.save(
        Dataset.from_dict(
            {
                "input_ids": [[1, 2, 3], [4]],
                "pixel_values": [[0.5] * 12, []],
                "pixel_values_shape": [[1, 3, 2, 2], [0]],
            },
            features=Features(
                input_ids=Sequence(Value("int32")),
                pixel_values=Sequence(Value("float32")),  # as the tokens artifact stores them
                pixel_values_shape=Sequence(Value("int64")),
            ),
        )
    )
    table = tokens.preview()
    column = table["columns"].index("pixel_values")
    assert [row[column] for row in table["data"]] == [
        "<float32 array [1, 3, 2, 2]>",
        "(no image)",
    ]
    assert "pixel_values_shape" not in table["columns"]
