"""The seed's example, unchanged but for the import and a local tiny model; raw data formats."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sft_pipeline import SFTTrainer
from sft_pipeline.model import device

PAIRS = [
    {"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(12)
]


def _args(tmp_path, **extra):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        fp16=True,  # not possible on CPU: the trainer must warn and fall back, not fail
        report_to="none",
        max_steps=4,
        logging_steps=1,
    )
    return TrainingArguments(**{**values, **extra})


@pytest.mark.parametrize("use_peft", [False, True])
def test_seed_example(tmp_path, tiny_model_dir, use_peft, monkeypatch):
    monkeypatch.setattr(device, "_WARNED", set())  # the warning is once per process
    model_dir = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extra = {}
    if use_peft:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="fp16 was requested"):
        trainer = SFTTrainer(
            model=model,
            tokenizer=tokenizer,
            train_dataset=Dataset.from_list(PAIRS),
            dataset_text_field="prompt",
            max_seq_length=512,
            args=_args(tmp_path),
            **extra,
        )
    assert not trainer.args.fp16
    # prompt/response data trains prompt -> response: the prompt is never supervised.
    row = trainer.train_dataset[0]
    first_label = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert "What is 0 plus 0?" in tokenizer.decode(row["input_ids"][:first_label])
    assert tokenizer.decode([t for t in row["labels"] if t != -100]).endswith("<|im_end|>")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    history = trainer.state.log_history[0]
    for key in (
        "grad_norm",
        "learning_rate",
        "mean_token_accuracy",
        "num_tokens",
        "tokens_per_second",
    ):
        assert key in history

    inputs = tokenizer("What is 3 plus 3?", return_tensors="pt")
    out = trainer.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    trainer.save_model(str(tmp_path / "saved"))
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert ("adapter_config.json" in saved) if use_peft else ("model.safetensors" in saved)


def test_model_path_and_text_only_dataset_trains_lm(tmp_path, tiny_model_dir, caplog):
    model_dir = tiny_model_dir("qwen2")
    texts = Dataset.from_list([{"content": f"The number {i} is small."} for i in range(8)])
    trainer = SFTTrainer(
        model=str(model_dir),
        train_dataset=texts,
        dataset_text_field="content",
        args=_args(tmp_path, max_steps=2),
    )
    row = trainer.train_dataset[0]
    assert row["labels"] == row["input_ids"]  # language modelling: every token supervised
    trainer.train()


@pytest.mark.parametrize(
    "rows",
    [
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            }
        ],
        [{"instruction": "Add", "input": "1 and 2", "output": "3"}],
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}],
        [{"prompt": "Say A", "completion": "A"}],
    ],
    ids=["messages", "alpaca", "sharegpt", "prompt-completion"],
)
def test_raw_formats_supervise_only_the_assistant(tmp_path, tiny_model_dir, rows):
    model_dir = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(
        model=str(model_dir),
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows * 2),
        args=_args(tmp_path),
    )
    row = trainer.train_dataset[0]
    supervised = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert supervised.endswith("<|im_end|>")
    assert "<|im_start|>" not in supervised  # no prompt or role header is trained on


def test_packing_through_the_constructor(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("mistral")
    trainer = SFTTrainer(
        model=str(model_dir),
        train_dataset=Dataset.from_list(PAIRS),
        packing=True,
        max_length=128,
        args=_args(tmp_path, max_steps=2),
    )
    assert "seq_lengths" in trainer.train_dataset.column_names
    assert len(trainer.train_dataset) < len(PAIRS)
    trainer.train()


def test_lora_with_gradient_checkpointing_trains_exactly_as_without(tmp_path, tiny_model_dir):
    from peft import LoraConfig

    model_dir = tiny_model_dir("llama")
    losses = {}
    for checkpointing in (False, True):
        trainer = SFTTrainer(
            model=str(model_dir),
            train_dataset=Dataset.from_list(PAIRS),
            peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"),
            args=_args(
                tmp_path / str(checkpointing), max_steps=3, gradient_checkpointing=checkpointing
            ),
        )
        if checkpointing:
            assert trainer.args.activation_checkpointing_kwargs == {"use_reentrant": False}
        trainer.train()
        losses[checkpointing] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Recomputing activations in backward changes memory, not the loss: the first step is the
    # same forward; later steps agree up to Adam amplifying float-rounding differences of
    # near-zero gradients (LoRA's B starts at zero).
    assert len(losses[True]) == 3
    assert losses[True][0] == pytest.approx(losses[False][0], abs=1e-6)
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)


def test_eval_on_packed_data_reports_token_weighted_metrics(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("gemma")
    trainer = SFTTrainer(
        model=str(model_dir),
        train_dataset=Dataset.from_list(PAIRS),
        eval_dataset=Dataset.from_list(PAIRS[:6]),
        packing=True,
        args=_args(tmp_path, max_steps=1, dataloader_num_workers=2),
    )
    assert trainer.args.dataloader_num_workers == 0  # CPU: workers would take training cores
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_mean_token_accuracy", "eval_supervised_tokens"):
        assert key in metrics
