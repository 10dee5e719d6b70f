"""Hub datasets: only the requested split's files are downloaded, and names from parameters
(repository id, revision, split, subset) never reach the cache as paths that leave it.

The Hub is faked where it would be reached over the network (the repository's file list and the
download); what the download leaves is the cache layout huggingface_hub itself writes
(`snapshots/<commit>/` links into `blobs/`, `refs/<revision>`), which the real
`snapshot_download` then reads offline.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest

from sft_pipeline.common.config import DataConfig
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import hub
from sft_pipeline.data.ingestion import ingest

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REPO = "owner/multi"


def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"q{i}" for i in range(n)], "response": ["a"] * n})


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A dataset repository with two splits, two subsets and a large unrelated file; returns
    (remote folder, the allow_patterns of every download, the cache folder)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

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
    names = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    cache = tmp_path / "hf" / "hub"
    downloads: list = []
    real_snapshot_download = huggingface_hub.snapshot_download

    def list_repo_files(self, repo_id, *, repo_type=None, revision=None, **kwargs):
        assert (repo_id, repo_type) == (REPO, "dataset")
        return names

    def snapshot_download(repo_id, *, repo_type=None, revision=None, cache_dir=None, **kwargs):
        if kwargs.get("local_files_only"):
            return real_snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir, **kwargs
            )
        allow = kwargs.get("allow_patterns")
        downloads.append(allow)
        storage = Path(cache_dir or cache) / f"datasets--{repo_id.replace('/', '--')}"
        snapshot = storage / "snapshots" / COMMIT
        for name in filter_repo_objects(names, allow_patterns=allow):
            data = (remote / name).read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / (revision or "main")).write_text(COMMIT)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
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
