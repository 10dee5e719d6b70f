"""A base that exists only as a bitsandbytes 4-bit checkpoint: QLoRA on it, merged unquantized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_tokenizer, save_tiny_model
from tests.finetune.test_distributed import tokenized

IDS = torch.tensor([[3, 40, 41, 120, 7, 9, 250, 33]])


def save_4bit_checkpoint(source: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quant, dtype=torch.float32, device_map="cpu"
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def dequantized(model):
    """`model` with each bitsandbytes 4-bit layer replaced by an fp32 Linear of its weights."""
    import bitsandbytes.functional as bnbf

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ != "Linear4bit":
                continue
            weight = bnbf.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=child.bias is not None)
            linear.weight.data = weight
            if child.bias is not None:
                linear.bias.data = child.bias.data.float()
            setattr(module, name, linear)
    return model.eval()


@pytest.mark.slow
def test_prequantized_base_trains_as_qlora_and_merges_into_its_dequantized_weights(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_pipeline.common.config import DataConfig
    from sft_pipeline.pipelines.sft import nodes

    source = save_tiny_model(tmp_path / "tiny", "llama", initializer_range=0.2)
    checkpoint = save_4bit_checkpoint(source, tmp_path / "tiny-bnb-4bit")
    assert "quantization_config" in json.loads((checkpoint / "config.json").read_text())

    # The pipeline's nodes, driven by parameters only.
    base_dir = tmp_path / "base"
    nodes.prepare_base_model({"name_or_path": str(checkpoint)}).save_pretrained(base_dir)
    manifest = json.loads((base_dir / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "bitsandbytes-4bit"
    tokens = tokenized(build_tiny_tokenizer(), 2)
    training = {
        "output_dir": str(tmp_path / "checkpoints"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 2e-2,
        "warmup_ratio": 0.0,
        "save_steps": 100,
    }
    adapter, _, summary = nodes.train_adapter(
        base_dir, tokens, None, {}, {"r": 4, "alpha": 8, "dropout": 0.0}, training, 128
    )
    assert summary["method"] == "qlora"
    adapter.save_pretrained(tmp_path / "adapter")
    data = DataConfig()  # the defaults, as a run that sets no data key
    merged = nodes.merge_adapter(
        base_dir,
        tmp_path / "adapter",
        data.path,
        data.schema_,
        data.columns,
        data.eval_fraction,
        data.seed,
        {},
        summary,
    )
    merged.save_pretrained(tmp_path / "merged")

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in tuned.parameters())
    assert not any("4bit" in type(m).__name__ for m in tuned.modules())
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "dequantized 4-bit weights" in card

    # Reference: the 4-bit checkpoint reloaded from disk (never run before), its 4-bit layers
    # dequantized to fp32 by bitsandbytes itself, + the adapter through PEFT. (bitsandbytes'
    # own 4-bit CPU forward is not exact on every CPU: 0.08 off the dequantized weights on one
    # with AVX512-BF16, so it cannot be the reference.)
    base = dequantized(AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu"))
    reference = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.inference_mode():
        expected, got = reference(IDS).logits, tuned(IDS).logits
        plain = dequantized(AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu"))
        plain = plain(IDS).logits
    assert (expected - plain).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
