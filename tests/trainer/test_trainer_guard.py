"""Divergence stops training: a non-finite loss or gradient norm raises before the optimizer step,
naming the step and the numbers; the last good checkpoint stays and nothing diverged is saved."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainingArguments

from sft_pipeline.common.errors import TrainingDivergedError
from sft_pipeline.trainer import SFTTrainer
from tests.conftest import build_tiny_model, build_tiny_tokenizer

DATA = [
    {"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
    {"prompt": "Convert: name Alice, age 31", "response": '{"name": "Alice", "age": 31}'},
] * 8


def _trainer(tmp_path: Path, model, **args) -> SFTTrainer:
    tokenizer = build_tiny_tokenizer()
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=2,
        save_steps=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    settings.update(args)
    return SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=Dataset.from_list(DATA),
        max_seq_length=64,
        args=TrainingArguments(**settings),
    )


def _checkpoints(tmp_path: Path) -> list[int]:
    out = tmp_path / "out"
    found = [p.name for p in out.glob("checkpoint-*")] if out.is_dir() else []
    return sorted(int(name.split("-")[1]) for name in found)


def test_a_base_whose_forward_overflows_stops_at_step_one_and_saves_nothing(tmp_path: Path):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        # Logits of +-inf: the cross-entropy of the very first batch is NaN.
        model.lm_head.weight.mul_(1e38)
    trainer = _trainer(tmp_path, model)
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train()
    message = str(info.value)
    assert "optimizer step 1 of 8" in message
    assert re.search(r"loss (nan|inf)", message)
    assert "gradient norm" in message and "learning rate 5e-05" in message
    assert "learning_rate" in message and "warmup" in message and "precision" in message
    assert "no checkpoint was saved" in message
    assert _checkpoints(tmp_path) == []
    assert trainer.state.global_step == 0  # the step was never applied


def _tiny_gpt2(vocab_size: int):
    # LayerNorm (GPT-2) turns exploding activations into NaN; RMSNorm families (Llama) saturate
    # to uniform predictions with a finite loss instead.
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt2", vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256
    )
    return AutoModelForCausalLM.from_config(config)


def test_a_far_too_high_learning_rate_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    model = _tiny_gpt2(len(build_tiny_tokenizer()))
    trainer = _trainer(tmp_path, model, learning_rate=1e6, lr_scheduler_type="constant")
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train()
    message = str(info.value)
    step = int(re.search(r"optimizer step (\d+) of 8", message).group(1))
    assert "learning rate 1e+06" in message and "e.g. 1e+05" in message
    # Saved every step: exactly the steps before the diverged one, all with finite weights.
    assert step > 1  # the first step is finite: its checkpoint is the last good one
    assert _checkpoints(tmp_path) == list(range(1, step))
    last = tmp_path / "out" / f"checkpoint-{step - 1}"
    assert f"checkpoint-{step - 1}" in message
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert trainer.state.global_step == step - 1


def test_diverged_weights_are_never_applied_so_the_model_in_memory_stays_finite(tmp_path: Path):
    model = _tiny_gpt2(len(build_tiny_tokenizer()))
    trainer = _trainer(tmp_path, model, learning_rate=1e6, save_steps=100)
    with pytest.raises(TrainingDivergedError):
        trainer.train()
    # The optimizer never stepped on the non-finite gradients.
    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_the_message_names_the_process_when_several_train():
    from sft_pipeline.trainer.guard import diverged_message

    message = diverged_message(
        step=5,
        max_steps=10,
        losses=[1.25, math.nan],
        grad_norm=math.inf,
        learning_rate=2e-4,
        ranks=[1],
        last_checkpoint="out/checkpoint-4",
        fp16=True,
    )
    assert "step 5 of 10 (process 1 of 2)" in message and "loss nan" in message
    assert "gradient norm inf" in message and "out/checkpoint-4 is kept" in message
    assert "instead of fp16" in message
