"""Merge and GGUF export refuse NaN or infinite weights, naming the tensor; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from sft_pipeline.common.atomic import atomic_path
from sft_pipeline.common.config import DataConfig, ExportConfig
from sft_pipeline.common.errors import NonFiniteWeightsError
from sft_pipeline.export.gguf import export
from sft_pipeline.export.merge import merge
from tests.export.test_export import merged_folder
from tests.export.test_merging import SUMMARY, make_base, make_lora_adapter

LORA_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _poison(file: Path, name: str, value: float) -> None:
    tensors = load_file(str(file))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(file), metadata={"format": "pt"})


def _save_atomically(obj, target: Path) -> None:
    # As the catalog's ModelFolderDataset saves: a failed save leaves no folder at `target`.
    with atomic_path(target, is_dir=True) as tmp:
        obj.save_pretrained(tmp)


def test_a_nan_adapter_is_refused_before_merging_naming_its_tensor(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    base_dir = make_base(src, tmp_path / "base")
    adapter_dir = make_lora_adapter(base_dir, tmp_path / "adapter", src)
    _poison(adapter_dir / "adapter_model.safetensors", LORA_B, float("nan"))
    with pytest.raises(NonFiniteWeightsError) as info:
        merge(base_dir, adapter_dir, DataConfig(), SUMMARY)
    assert LORA_B in str(info.value) and "1 NaN" in str(info.value)


def test_an_infinite_base_weight_stops_the_shardwise_merge_and_writes_no_folder(
    tiny_model_dir, tmp_path
):
    src = tiny_model_dir("llama")
    _poison(src / "model.safetensors", "model.layers.0.mlp.down_proj.weight", float("inf"))
    base_dir = make_base(src, tmp_path / "base")
    adapter_dir = make_lora_adapter(base_dir, tmp_path / "adapter", src)
    merged = merge(base_dir, adapter_dir, DataConfig(), SUMMARY)
    with pytest.raises(NonFiniteWeightsError) as info:
        _save_atomically(merged, tmp_path / "merged")
    assert "model.layers.0.mlp.down_proj.weight" in str(info.value)
    assert "infinite" in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_the_gguf_export_refuses_a_nan_tensor_naming_it(tmp_path):
    folder = merged_folder(tmp_path / "merged")
    _poison(folder / "model.safetensors", "model.layers.1.self_attn.q_proj.weight", float("nan"))
    with pytest.raises(NonFiniteWeightsError) as info:
        _save_atomically(export(folder, ExportConfig(gguf=["f16"])), tmp_path / "export")
    assert "model.layers.1.self_attn.q_proj.weight" in str(info.value)
    assert not (tmp_path / "export").exists()


def test_a_finite_weight_past_the_f16_range_is_refused_in_an_f16_file(tmp_path):
    folder = merged_folder(tmp_path / "merged")
    _poison(folder / "model.safetensors", "model.layers.0.mlp.up_proj.weight", 1e6)
    with pytest.raises(NonFiniteWeightsError) as info:
        _save_atomically(export(folder, ExportConfig(gguf=["f16"])), tmp_path / "export")
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value) and "f16" in str(info.value)
    # The same weights fit an f32 file.
    _save_atomically(export(folder, ExportConfig(gguf=["f32"])), tmp_path / "export32")
    assert (tmp_path / "export32" / "model-f32.gguf").is_file()
