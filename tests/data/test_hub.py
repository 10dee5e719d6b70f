"""Hub datasets: only the requested split's files are downloaded, and names from parameters
(repository id, revision, split, subset) never reach the cache as paths that leave it.

The Hub is faked where it would be reached over the network (the repository's file list and the
download); what the download leaves is the cache layout huggingface_hub itself writes
(`snapshots/<commit>/` links into `blobs/`, `refs/<revision>`), which the real
`snapshot_download` then reads offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from sft_pipeline.common.config import DataConfig, ValidationConfig
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import hub
from tests.data.rows import ingest, validate

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REPO = "owner/multi"


def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"q{i}" for i in range(n)], "response": ["a"] * n})


def write_snapshot(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """The layout huggingface_hub leaves in its cache after downloading `files` of a dataset
    repository: `snapshots/<commit>/<name>` links into `blobs/`, `refs/<revision>`."""
    storage = cache / f"datasets--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(COMMIT)
    return snapshot


def fake_hub_of(tmp_path: Path, monkeypatch, remote: Path, repo: str = REPO):
    """The Hub faked over the network for one repository whose files are those in `remote`;
    returns (the allow_patterns of every download, the cache folder)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    cache = tmp_path / "hf" / "hub"
    downloads: list = []
    real_snapshot_download = huggingface_hub.snapshot_download

    def list_repo_files(self, repo_id, *, repo_type=None, revision=None, **kwargs):
        assert (repo_id, repo_type) == (repo, "dataset")
        return names

    def snapshot_download(repo_id, *, repo_type=None, revision=None, cache_dir=None, **kwargs):
        if kwargs.get("local_files_only"):
            return real_snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir, **kwargs
            )
        allow = kwargs.get("allow_patterns")
        downloads.append(allow)
        wanted = filter_repo_objects(names, allow_patterns=allow)
        files = {name: (remote / name).read_bytes() for name in wanted}
        return str(write_snapshot(Path(cache_dir or cache), repo_id, files, revision or "main"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return downloads, cache


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A dataset repository with two splits, two subsets and a large unrelated file; returns
    (remote folder, the allow_patterns of every download, the cache folder)."""
    remote = tmp_path / "remote"
    layout = {
        "data/train-00000-of-00001.parquet": _rows(3),
        "data/test-00000-of-00001.parquet": _rows(1),
        "chat/train-00000-of-00001.parquet": _rows(2),
        "code/train-00000-of-00001.parquet": _rows(4),
    }
    for name, frame in layout.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(remote / name, index=False)
    (remote / "README.md").write_text("# multi\n")
    (remote / "raw").mkdir()
    (remote / "raw" / "dump.jsonl").write_bytes(b"{}\n" * 1000)  # never wanted
    downloads, cache = fake_hub_of(tmp_path, monkeypatch, remote)
    return remote, downloads, cache


def snapshot_files(cache: Path) -> list[str]:
    snapshot = cache / f"datasets--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def test_a_hub_dataset_downloads_only_the_files_of_the_requested_split(fake_hub, monkeypatch):
    _remote, downloads, cache = fake_hub
    records = ingest(DataConfig(path=f"hf://datasets/{REPO}", split="test"))
    assert len(records) == 1
    assert downloads == [["data/test-00000-of-00001.parquet"]]
    assert snapshot_files(cache) == ["data/test-00000-of-00001.parquet"]

    # Later, offline: the real huggingface_hub finds the split in its cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = ingest(DataConfig(path=f"hf://datasets/{REPO}", split="test"))
    assert again["source_file"].tolist() == records["source_file"].tolist()
    assert len(downloads) == 1


def test_a_hub_dataset_with_subsets_downloads_only_the_requested_subset(fake_hub):
    _remote, downloads, cache = fake_hub
    records = ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train", subset="code"))
    assert len(records) == 4
    assert downloads == [["code/train-00000-of-00001.parquet"]]
    assert snapshot_files(cache) == ["code/train-00000-of-00001.parquet"]
    assert set(records["source_file"]) == {
        f"hf://datasets/{REPO}@{COMMIT}/code/train-00000-of-00001.parquet"
    }


@pytest.mark.parametrize(
    ("path", "split", "subset", "named"),
    [
        (f"hf://datasets/{REPO}@../../../../etc", "train", None, "revision '../../../../etc'"),
        (f"hf://datasets/{REPO}@/abs", "train", None, "revision '/abs'"),
        ("hf://datasets/owner/..", "train", None, "'owner/..' is not a Hub id"),
        (f"hf://datasets/{REPO}", "../../x", None, "data.split: '../../x'"),
        (f"hf://datasets/{REPO}", "train", "a/../../b", "data.subset: 'a/../../b'"),
    ],
)
def test_hub_names_that_would_leave_the_cache_are_refused_naming_the_key(
    fake_hub, path, split, subset, named
):
    _remote, downloads, _cache = fake_hub
    with pytest.raises(InputFileError) as exc:
        ingest(DataConfig(path=path, split=split, subset=subset))
    assert named in str(exc.value)
    assert downloads == []


def test_split_selection_keeps_stars_within_one_folder():
    names = ["data/train-0.parquet", "data/deep/train-1.parquet", "train/x/y.parquet"]
    assert hub.select_split(names, "train", None) == ["data/train-0.parquet"]
    assert hub.select_split(["a.parquet", "b/c.parquet"], "train", None) == ["a.parquet"]
    assert hub.select_split(["a.parquet"], "test", None) == []


def test_a_hub_model_id_or_revision_that_is_not_a_name_is_refused_naming_the_key(monkeypatch):
    from sft_pipeline.model.base_model import ModelResolutionError, _hub_snapshot

    with pytest.raises(ModelResolutionError, match=r"model\.revision: revision '\.\./\.\./x'"):
        _hub_snapshot("owner/model", "../../x")
    with pytest.raises(ModelResolutionError, match=r"model\.name_or_path: 'owner/\.\.'"):
        _hub_snapshot("owner/..", None)


# --- which files are the requested split ----------------------------------------------------


def _jsonl(prompts: list[str]) -> bytes:
    rows = [{"prompt": p, "response": "a"} for p in prompts]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """The local Hugging Face cache, read offline (as the real snapshot_download reads it)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def test_a_snapshot_without_train_files_trains_on_its_unnamed_file_never_on_test_or_validation(
    offline_cache,
):
    write_snapshot(
        offline_cache,
        REPO,
        {
            "data.jsonl": _jsonl(["d1", "d2"]),
            "test.jsonl": _jsonl(["t1"]),
            "validation.jsonl": _jsonl(["v1"]),
            "README.md": b"# three files\n",
        },
    )
    records = ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train"))
    prompts = [json.loads(m)[0]["content"] for m in records["messages"]]
    assert prompts == ["d1", "d2"]
    assert {s.rsplit("/", 1)[1] for s in records["source_file"]} == {"data.jsonl"}


@pytest.mark.parametrize(
    "names",
    [
        ["test.jsonl", "validation.jsonl"],
        ["data/test-00000-of-00001.jsonl", "data/dev-00000-of-00001.jsonl"],
        ["eval_set.jsonl"],
    ],
)
def test_a_snapshot_naming_only_other_splits_stops_naming_its_files_and_data_split(
    offline_cache, names
):
    write_snapshot(offline_cache, REPO, {name: _jsonl(["x"]) for name in names})
    with pytest.raises(InputFileError) as caught:
        ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train"))
    message = str(caught.value)
    assert "data.split" in message and "'train'" in message
    assert all(name in message for name in names), message


def test_online_a_repository_naming_only_other_splits_is_refused_before_any_download(
    tmp_path, monkeypatch
):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "test.jsonl").write_bytes(_jsonl(["t1"]))
    (remote / "validation.jsonl").write_bytes(_jsonl(["v1"]))
    downloads, _cache = fake_hub_of(tmp_path, monkeypatch, remote)
    with pytest.raises(InputFileError, match=r"test\.jsonl.*validation\.jsonl.*data\.split"):
        ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train"))
    assert downloads == []


def test_split_words_are_found_as_words_of_a_file_name_not_inside_other_words():
    names = ["contest.jsonl", "developer.jsonl", "train_notes.md", "test.jsonl", "val.parquet"]
    assert hub.select_split(names, "train", None) == ["contest.jsonl", "developer.jsonl"]


# --- images of a Hub dataset ----------------------------------------------------------------


def _png(colour: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _vision_repo(tmp_path: Path, image: str = "images/cat.png") -> Path:
    remote = tmp_path / "remote"
    (remote / "images").mkdir(parents=True)
    (remote / "images" / "cat.png").write_bytes(_png("red"))
    (remote / "images" / "unused.png").write_bytes(_png("blue"))
    row = {
        "messages": [
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A cat."},
        ],
        "images": [image],
    }
    (remote / "train.jsonl").write_text(json.dumps(row) + "\n")
    return remote


def test_the_images_a_hub_dataset_names_are_downloaded_from_the_same_commit(tmp_path, monkeypatch):
    downloads, cache = fake_hub_of(tmp_path, monkeypatch, _vision_repo(tmp_path))
    records = ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train"))
    assert downloads == [["train.jsonl"], ["images/cat.png"]]
    snapshot = cache / f"datasets--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.rglob("*") if p.is_file()) == ["cat.png", "train.jsonl"]
    valid, rejected, _report = validate(records, ValidationConfig())
    assert rejected == [] and len(valid) == 1
    part = json.loads(valid["messages"][0])[0]["content"][0]
    assert part["sha256"] == hashlib.sha256(_png("red")).hexdigest()

    # Later, offline, the image comes from the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train"))
    assert again["record_id"].tolist() == records["record_id"].tolist()
    assert len(downloads) == 2


def test_offline_an_image_missing_from_the_cache_stops_ingestion_saying_so(offline_cache, tmp_path):
    remote = _vision_repo(tmp_path)
    write_snapshot(offline_cache, REPO, {"train.jsonl": (remote / "train.jsonl").read_bytes()})
    with pytest.raises(InputFileError) as caught:
        ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train"))
    message = str(caught.value)
    assert "images/cat.png" in message and "HF_HUB_OFFLINE" in message and "line 1" in message


@pytest.mark.parametrize("image", ["/etc/hostname", "../../../../../../etc/hostname"])
def test_a_hub_dataset_may_name_only_images_of_its_own_repository(tmp_path, monkeypatch, image):
    downloads, _cache = fake_hub_of(tmp_path, monkeypatch, _vision_repo(tmp_path, image))
    with pytest.raises(InputFileError) as caught:
        ingest(DataConfig(path=f"hf://datasets/{REPO}", split="train"))
    message = str(caught.value)
    assert "not a file of the Hub repository" in message and "line 1" in message, message
    assert downloads == [["train.jsonl"]]
