"""Safetensors files: what we read agrees with the safetensors library, what we write it reads
back, and a file cut short is never taken for whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sft_pipeline.common.paths import UnsafePathError
from sft_pipeline.common.safetensors_files import (
    INDEX,
    ShardReader,
    UnsupportedDtype,
    read_header,
    safetensors_dtype,
    torch_dtype,
    weight_map,
    weights_problem,
    write_index,
    write_shard,
)

TENSORS = {
    "embed.weight": torch.randn(7, 5, dtype=torch.bfloat16),
    "norm.weight": torch.ones(5, dtype=torch.float32),
    "codes": torch.arange(12, dtype=torch.uint8).reshape(3, 4),
    "empty": torch.zeros(0, 3, dtype=torch.float16),
}


def _sharded(folder: Path) -> Path:
    """Two shards and their index, written by the safetensors library itself."""
    folder.mkdir()
    first = {k: TENSORS[k] for k in ("embed.weight", "norm.weight")}
    second = {k: TENSORS[k] for k in ("codes", "empty")}
    save_file(first, folder / "model-00001-of-00002.safetensors")
    save_file(second, folder / "model-00002-of-00002.safetensors")
    mapping = {**dict.fromkeys(first, "model-00001-of-00002.safetensors")}
    mapping.update(dict.fromkeys(second, "model-00002-of-00002.safetensors"))
    write_index(folder, mapping, total_size=0)
    return folder


def test_the_reader_returns_what_the_safetensors_library_wrote(tmp_path):
    folder = _sharded(tmp_path / "m")
    reader = ShardReader(folder)
    assert reader.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, tensor in TENSORS.items():
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert reader.meta(name) == (safetensors_dtype(tensor.dtype), list(tensor.shape))


def test_a_single_file_folder_maps_every_tensor_to_model_safetensors(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    assert weight_map(tmp_path) == dict.fromkeys(TENSORS, "model.safetensors")
    header = read_header(tmp_path / "model.safetensors")
    assert header["codes"].dtype == "U8" and header["codes"].shape == (3, 4)
    assert header["codes"].end - header["codes"].begin == 12


def test_a_folder_without_weights_says_which_files_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors\.index\.json nor"):
        weight_map(tmp_path)


def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": "../x.safetensors"}}))
    with pytest.raises(UnsafePathError, match=r"'\.\./x\.safetensors' leaves"):
        ShardReader(tmp_path)


def test_a_streamed_shard_is_read_back_by_the_safetensors_library(tmp_path):
    plan = {name: (safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in TENSORS.items()}
    computed = []

    def compute(name):
        computed.append(name)
        return TENSORS[name]

    written = write_shard(tmp_path / "s.safetensors", plan, compute)
    assert computed == list(TENSORS)  # one at a time, in plan order
    assert written == sum(t.numel() * t.element_size() for t in TENSORS.values())
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(TENSORS)
    assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in TENSORS.items())
    assert weights_problem(tmp_path / "s.safetensors") is None


def test_a_tensor_that_differs_from_its_plan_stops_the_shard(tmp_path):
    plan = {"w": ("BF16", (2, 2))}
    with pytest.raises(RuntimeError, match=r"s\.safetensors: tensor w is torch\.float32"):
        write_shard(tmp_path / "s.safetensors", plan, lambda _: torch.zeros(2, 2))


def test_dtypes_map_both_ways_and_an_unknown_one_is_named():
    assert torch_dtype("BF16") is torch.bfloat16
    assert safetensors_dtype(torch.float8_e4m3fn) == "F8_E4M3"
    with pytest.raises(UnsupportedDtype, match="F4"):
        torch_dtype("F4")


def test_whole_weights_pass_and_a_truncated_shard_is_named(tmp_path):
    folder = _sharded(tmp_path / "m")
    assert weights_problem(folder / INDEX) is None
    shard = folder / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    problem = weights_problem(folder / INDEX)
    assert problem == (
        f"{shard.name} is truncated ({len(data) - 3} bytes, its header expects {len(data)})"
    )
    shard.write_bytes(data[:10])
    assert weights_problem(folder / INDEX) == f"{shard.name} is truncated (header past the end)"


def test_a_missing_shard_or_an_unusable_index_is_a_problem_not_an_exception(tmp_path):
    folder = _sharded(tmp_path / "m")
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert weights_problem(folder / INDEX) == "model-00002-of-00002.safetensors is missing"
    (folder / INDEX).write_text("{")
    assert weights_problem(folder / INDEX).startswith(f"{INDEX} is unusable (")
