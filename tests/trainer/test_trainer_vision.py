"""The trainer on its own with vision-language data, and image rows that cannot fit."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def llava(tmp_path_factory, fixtures_dir):
    from tests.vision_models import save_vision_model

    return save_vision_model(tmp_path_factory.mktemp("llava"), "llava", fixtures_dir)


def test_a_row_whose_image_tokens_do_not_fit_is_rejected_not_cut(llava, fixtures_dir):
    from transformers import AutoProcessor

    from sft_pipeline.data.vision_tokens import (
        probe_outputs,
        tokenize_vision_batch,
        vision_features,
    )

    processor = AutoProcessor.from_pretrained(llava, backend="pil")
    image = str(fixtures_dir / "datasets/llamafactory/mllm_demo_data/1.jpg")
    row = {
        "record_id": "r1",
        "segments": [
            {"text": "USER: <image>\nWho? ASSISTANT:", "supervised": False},
            {"text": " Kane.<|endoftext|>", "supervised": True},
        ],
        "images": [{"path": image}],
    }
    features = vision_features(probe_outputs(processor))
    rejected: list = []
    # The image's 4 tokens start at position 4: a limit of 6 would cut them.
    table = tokenize_vision_batch([row], processor, features, 6, rejected, [])
    assert table.num_rows == 0
    assert "image tokens run to position 8" in rejected[0]["reason"]
    assert "max_seq_length=6" in rejected[0]["reason"]
    kept = tokenize_vision_batch([row], processor, features, 64, [], [])
    assert kept.num_rows == 1 and kept["pixel_values_shape"].to_pylist() == [[1, 3, 28, 28]]


def test_trl_sft_vlm_style_code_runs_with_only_the_import_changed(llava, fixtures_dir, tmp_path):
    # As TRL's sft_vlm example writes it; only the import of SFTConfig/SFTTrainer differs.
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sft_pipeline.trainer import SFTConfig, SFTTrainer

    picture = Image.open(fixtures_dir / "datasets/llamafactory/mllm_demo_data/2.jpg")
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": f"Q{k}?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A football player."}]},
            ],
            "images": [picture],
        }
        for k in range(4)
    ]
    dataset = Dataset.from_list(rows)
    model = AutoModelForImageTextToText.from_pretrained(llava, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(llava, backend="pil")
    training_args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        report_to="none",
        packing=False,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("language_model" in n for n in trained)  # vision tower frozen


def test_packing_image_rows_is_refused_with_the_parameter_to_change(llava):
    from sft_pipeline.trainer.vision import refuse_packing

    with pytest.raises(ValueError, match=r"training\.packing: false"):
        refuse_packing("train_dataset", True, False)
