"""Images named by path are inputs of ingestion: their folders are DVC deps of `ingest_records`,
found by the resolver ingestion itself checks every image against."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from PIL import Image

from sft_pipeline.common.config import DataConfig
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import image_deps
from tests.data.rows import ingest


def _image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _row(image: str, k: int = 0) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"<image>What is shown? ({k})"},
            {"role": "assistant", "content": "A red square."},
        ],
        "images": [image],
    }


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """data/raw/vqa.jsonl naming img/cats/1.jpg, img/dogs/2.jpg, 3.jpg beside it and an image
    outside the project; data/raw/text.jsonl without images."""
    raw = tmp_path / "project/data/raw"
    outside = tmp_path / "elsewhere/pics/4.jpg"
    for relpath in ("img/cats/1.jpg", "img/dogs/2.jpg", "3.jpg"):
        _image(raw / relpath)
    _image(outside)
    names = ["img/cats/1.jpg", "img/dogs/2.jpg", "3.jpg", str(outside), "img/missing.jpg"]
    _write(raw / "vqa.jsonl", [_row(n, k) for k, n in enumerate(names)])
    _write(raw / "text.jsonl", [{"prompt": "Hi", "response": "Hello"}] * 3)
    return tmp_path / "project"


def test_image_folders_of_the_records_are_the_deps_and_text_data_has_none(project: Path) -> None:
    cfg = DataConfig(path=["data/raw/vqa.jsonl", "data/raw/text.jsonl"])
    deps = image_deps.local_image_files(cfg, project)
    outside = (project.parent / "elsewhere/pics").resolve().as_posix()
    assert deps == ["data/raw/img", "data/raw/3.jpg", outside]
    assert image_deps.local_image_files(DataConfig(path="data/raw/text.jsonl"), project) == []


def test_an_image_past_the_sampled_records_outside_their_folders_stops_ingestion(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = project / "data/raw"
    _image(raw / "late/5.jpg")
    _write(raw / "late.jsonl", [_row("img/cats/1.jpg", 0), _row("img/cats/1.jpg", 1)])
    with (raw / "late.jsonl").open("a") as f:
        f.write(json.dumps(_row("late/5.jpg", 2)) + "\n")
    monkeypatch.setattr(image_deps, "DETECT_ROWS", 2)
    with contextlib.chdir(project):
        cfg = DataConfig(path="data/raw/late.jsonl")
        assert image_deps.local_image_files(cfg, project) == ["data/raw/img"]
        with pytest.raises(InputFileError) as caught:
            ingest(cfg)
        message = str(caught.value)
        assert "data/raw/late.jsonl, line 3" in message and "image data/raw/late/5.jpg" in message
        assert "data.images" in message and "kedro dvc generate" in message
        # Named explicitly, the folders are the deps and every image is tracked.
        named = DataConfig(path="data/raw/late.jsonl", images=["data/raw/img", "data/raw/late"])
        assert image_deps.local_image_files(named, project) == ["data/raw/img", "data/raw/late"]
        assert len(ingest(named)) == 3


def test_a_data_images_entry_that_matches_nothing_is_an_error_naming_the_parameter(
    project: Path,
) -> None:
    with contextlib.chdir(project):
        cfg = DataConfig(path="data/raw/vqa.jsonl", images="data/raw/pictures")
        with pytest.raises(InputFileError, match=r"data\.images.*'data/raw/pictures'.*no file"):
            ingest(cfg)


def test_records_hash_the_image_bytes_so_an_edited_image_changes_the_record(
    project: Path,
) -> None:
    with contextlib.chdir(project):
        cfg = DataConfig(path="data/raw/vqa.jsonl")
        before = ingest(cfg)["record_id"].tolist()
        _image(project / "data/raw/img/cats/1.jpg", colour=(30, 200, 30))
        after = ingest(cfg)["record_id"].tolist()
    assert after[0] != before[0] and after[1:] == before[1:]
