"""Shard-wise merge: each weight becomes base + scale * B @ A, in the base dtype and layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft_pipeline.export.errors import NotShardwise
from sft_pipeline.export.shard_merge import ShardwiseMerge, read_adapter
from tests.conftest import build_tiny_model, build_tiny_tokenizer


def save_sharded(model, out: Path, dtype) -> Path:
    model.to(dtype).save_pretrained(out, max_shard_size="60KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def lora_adapter(base_dir: Path, out: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(out)
    return out


def peft_merged(base_dir: Path, adapter_dir: Path, dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_merged_weights_are_base_plus_scaled_lora_in_the_base_dtype(tmp_path):
    tokenizer = build_tiny_tokenizer()
    base_dir = save_sharded(
        build_tiny_model("llama", len(tokenizer)), tmp_path / "b", torch.bfloat16
    )
    adapter_dir = lora_adapter(
        base_dir, tmp_path / "a", r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"
    )
    ShardwiseMerge(base_dir, adapter_dir).save_pretrained(tmp_path / "m")

    merged, base = read_folder(tmp_path / "m"), read_folder(base_dir)
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    scale = 8 / math.sqrt(4)  # rsLoRA
    name = "model.layers.1.self_attn.q_proj.weight"
    a = adapter[f"base_model.model.{name[:-7]}.lora_A.weight"]
    b = adapter[f"base_model.model.{name[:-7]}.lora_B.weight"]
    expected = (base[name].float() + scale * b.float() @ a.float()).to(torch.bfloat16)
    assert torch.equal(merged[name], expected)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    # Same shard layout, and an index that names every tensor.
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == sorted(
        p.name for p in base_dir.glob("*.safetensors")
    )
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged)
    # PEFT's merge_and_unload on the same bf16 base agrees to bf16 rounding of its own add.
    reference = peft_merged(base_dir, adapter_dir, torch.bfloat16)
    for key, value in merged.items():
        torch.testing.assert_close(value.float(), reference[key].float(), atol=2e-2, rtol=1e-2)


def test_modules_to_save_embeddings_and_resized_vocab_equal_peft_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", len(tokenizer))
    model.resize_token_embeddings(len(tokenizer) + 3, mean_resizing=False)
    base_dir = save_sharded(model, tmp_path / "b", torch.float32)
    adapter_dir = lora_adapter(
        base_dir,
        tmp_path / "a",
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 4},
    )
    ShardwiseMerge(base_dir, adapter_dir).save_pretrained(tmp_path / "m")
    merged = read_folder(tmp_path / "m")
    reference = peft_merged(base_dir, adapter_dir, torch.float32)
    assert merged.keys() == reference.keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=1e-5, msg=key)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.vocab_size == len(tokenizer) + 3
    assert getattr(loaded.config, "quantization_config", None) is None


def test_gpt2_conv1d_weights_are_merged_transposed(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    base_dir = tmp_path / "b"
    GPT2LMHeadModel(config).save_pretrained(base_dir)
    adapter_dir = lora_adapter(
        base_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]
    )
    ShardwiseMerge(base_dir, adapter_dir).save_pretrained(tmp_path / "m")
    merged = read_folder(tmp_path / "m")
    reference = peft_merged(base_dir, adapter_dir, torch.float32)
    for key, value in merged.items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=1e-5, msg=key)


def test_dora_is_left_to_a_whole_model_merge(tmp_path):
    tokenizer = build_tiny_tokenizer()
    base_dir = tmp_path / "b"
    build_tiny_model("llama", len(tokenizer)).save_pretrained(base_dir)
    adapter_dir = lora_adapter(
        base_dir, tmp_path / "a", r=4, use_dora=True, target_modules="all-linear"
    )
    with pytest.raises(NotShardwise, match="DoRA"):
        read_adapter(adapter_dir)


@pytest.mark.parametrize(
    "crafted", ["../../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"]
)
def test_a_crafted_shard_index_that_leaves_the_checkpoint_is_refused(tmp_path, crafted):
    from sft_pipeline.common.paths import UnsafePathError

    tokenizer = build_tiny_tokenizer()
    base_dir = save_sharded(
        build_tiny_model("llama", len(tokenizer)), tmp_path / "b", torch.float32
    )
    adapter_dir = lora_adapter(base_dir, tmp_path / "a", r=2, target_modules=["q_proj"])
    index_path = base_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensor = sorted(index["weight_map"])[0]
    index["weight_map"][tensor] = crafted
    index_path.write_text(json.dumps(index))

    with pytest.raises(UnsafePathError) as exc:
        ShardwiseMerge(base_dir, adapter_dir).save_pretrained(tmp_path / "m")
    message = str(exc.value)
    assert str(index_path) in message and repr(crafted) in message and tensor in message
    assert not (tmp_path / "m").exists()
    assert not (tmp_path / "outside.safetensors").exists()
