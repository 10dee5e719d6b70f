"""TRL's SFTConfig options and trainer behaviours, as code written for TRL expects them.

Evaluation metrics from logits, raw datasets handed to `evaluate`, PEFT prompt learning, a row's
own chat-template switches, the loss types, the packing strategies, skipped preparation, a chat
template from a file, the input checks, and the model tags.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_pipeline.trainer import SFTConfig, SFTTrainer
from sft_pipeline.trainer import sft_trainer as sft_trainer_module
from sft_pipeline.trainer.loss import logits_cross_entropy, supervised_cross_entropy
from sft_pipeline.trainer.packing import pack_by_strategy

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about autumn leaves falling in the quiet wind.",
    "You are a helpful assistant. Answer briefly and correctly.",
]
CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ],
    [
        {"role": "user", "content": "Convert the record to JSON: name Alice."},
        {"role": "assistant", "content": '{"name": "Alice"}'},
    ],
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tests.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


def _args(tmp_path, **overrides) -> SFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        max_length=64,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
    )
    values.update(overrides)
    return SFTConfig(**values)


def _trainer(qwen_dir, tmp_path, train=None, **kwargs) -> SFTTrainer:
    config = {k: kwargs.pop(k) for k in list(kwargs) if k in SFTConfig.__dataclass_fields__}
    model = kwargs.pop("model", None) or AutoModelForCausalLM.from_pretrained(qwen_dir)
    tokenizer = kwargs.pop("processing_class", None) or AutoTokenizer.from_pretrained(qwen_dir)
    return SFTTrainer(
        model=model,
        args=_args(tmp_path, **config),
        train_dataset=train if train is not None else Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        **kwargs,
    )


# ---------------------------------------------------------------------------- losses


def test_dft_loss_weighs_each_token_by_its_probability_in_the_chunked_head_and_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (2, 9))
    labels[:, :3] = -100

    chunked, _, count = supervised_cross_entropy(hidden, labels, weight, chunk_size=4, dft=True)
    grads_chunked = torch.autograd.grad(chunked, [hidden, weight])
    logits = hidden @ weight.T
    full, _, _ = logits_cross_entropy(logits, labels, dft=True)
    grads_full = torch.autograd.grad(full, [hidden, weight])

    mask = labels != -100
    log_p = torch.log_softmax(logits.detach(), -1).gather(-1, labels.clamp(min=0)[..., None])[
        ..., 0
    ][mask]
    expected = (-log_p * log_p.exp()).sum()
    assert count == mask.sum()
    assert torch.allclose(chunked.double(), expected, atol=1e-6)
    assert torch.allclose(full.double(), expected, atol=1e-6)
    for a, b in zip(grads_chunked, grads_full, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    plain, _, _ = supervised_cross_entropy(hidden, labels, weight, chunk_size=4)
    assert chunked < plain  # every weight is a probability below 1


def test_loss_type_is_checked_and_chunked_nll_is_nll(tmp_path):
    assert _args(tmp_path, loss_type="chunked_nll").loss_type == "nll"
    with pytest.raises(ValueError, match="loss_type must be one of"):
        _args(tmp_path, loss_type="focal")
    with pytest.raises(ValueError, match="packing_strategy must be one of"):
        _args(tmp_path, packing_strategy="greedy")


def test_dft_training_changes_the_weights(qwen_dir, tmp_path):
    trainer = _trainer(qwen_dir, tmp_path, loss_type="dft")
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.lm_head.weight)
    assert trainer.state.log_history[-1]["train_loss"] > 0


# ---------------------------------------------------------------------------- evaluation


def test_compute_metrics_gets_the_logits_or_their_preprocessing_and_the_labels(qwen_dir, tmp_path):
    seen = {}

    def keep_argmax(logits, labels):
        seen["logits_shape"] = tuple(logits.shape)
        return logits.argmax(-1)

    def metrics(prediction):
        predictions, labels = prediction.predictions, prediction.label_ids
        seen["shapes"] = (predictions.shape, labels.shape)
        supervised = labels[:, 1:] != -100
        hits = predictions[:, :-1][supervised] == labels[:, 1:][supervised]
        return {"next_token_accuracy": float(np.mean(hits))}

    eval_data = Dataset.from_dict({"text": TEXTS[:3]})
    trainer = _trainer(
        qwen_dir,
        tmp_path,
        eval_dataset=eval_data,
        compute_metrics=metrics,
        preprocess_logits_for_metrics=keep_argmax,
    )
    result = trainer.evaluate()
    vocab = trainer.model.config.vocab_size
    assert seen["logits_shape"][-1] == vocab
    assert seen["shapes"][0] == seen["shapes"][1]  # one prediction per label position
    assert 0.0 <= result["eval_next_token_accuracy"] <= 1.0
    # The loss comes from the same logits and agrees with the token accuracy we log.
    assert result["eval_mean_token_accuracy"] == pytest.approx(
        result["eval_next_token_accuracy"], abs=1e-6
    )


def test_evaluation_without_metrics_never_builds_full_logits(qwen_dir, tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("full logits built without a metric asking for them")

    monkeypatch.setattr(sft_trainer_module, "model_logits", refuse)
    trainer = _trainer(qwen_dir, tmp_path, eval_dataset=Dataset.from_dict({"text": TEXTS}))
    assert trainer.evaluate()["eval_loss"] > 0


def test_evaluate_prepares_a_raw_dataset_a_dict_of_them_and_a_stream(qwen_dir, tmp_path):
    trainer = _trainer(qwen_dir, tmp_path)
    raw = Dataset.from_dict({"text": TEXTS})
    plain = trainer.evaluate(eval_dataset=raw)["eval_loss"]
    both = trainer.evaluate(eval_dataset={"a": raw, "b": raw})
    assert both["eval_a_loss"] == pytest.approx(plain) == pytest.approx(both["eval_b_loss"])

    def rows():
        yield from ({"text": t} for t in TEXTS)

    streamed = trainer.evaluate(eval_dataset=IterableDataset.from_generator(rows))
    assert streamed["eval_loss"] == pytest.approx(plain, rel=1e-5)


# ---------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_prompt_learning_adapters_train(qwen_dir, tmp_path, kind):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    config = {
        "prompt_tuning": PromptTuningConfig,
        "prefix_tuning": PrefixTuningConfig,
        "p_tuning": PromptEncoderConfig,
    }[kind](task_type="CAUSAL_LM", num_virtual_tokens=4)
    trainer = _trainer(qwen_dir, tmp_path, peft_config=config)
    trainable = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
    }
    assert trainable and all("prompt_encoder" in n for n in trainable)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in trainable]
    assert all(not torch.equal(trainable[n], trainer.model.get_parameter(n)) for n in changed)


# ---------------------------------------------------------------------------- templates


SWITCH_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role | upper if shout else m.role }}\n"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{{ 'ASSISTANT' if shout else 'assistant' }}\n"
    "{% endif %}"
)


def test_a_rows_chat_template_kwargs_reach_the_template_for_that_row_only(qwen_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    tokenizer.chat_template = SWITCH_TEMPLATE
    data = Dataset.from_dict(
        {
            "messages": CONVERSATIONS,
            "chat_template_kwargs": [{"shout": True}, {"shout": False}],
        }
    )
    trainer = _trainer(qwen_dir, tmp_path, train=data, processing_class=tokenizer)
    texts = [tokenizer.decode(row["input_ids"]) for row in trainer.train_dataset]
    assert texts[0].startswith("<|im_start|>USER\n") and "<|im_start|>ASSISTANT\n" in texts[0]
    assert texts[1].startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in texts[1]
    # The reply is supervised in both, whatever its header says.
    for row in trainer.train_dataset:
        pairs = zip(row["input_ids"], row["labels"], strict=True)
        supervised = [token for token, label in pairs if label >= 0]
        assert tokenizer.decode(supervised).endswith("<|im_end|>")


def test_chat_template_path_replaces_the_tokenizers_template(qwen_dir, tmp_path):
    path = tmp_path / "shout.jinja"
    path.write_text(SWITCH_TEMPLATE.replace("shout", "true"), encoding="utf-8")
    data = Dataset.from_dict({"messages": CONVERSATIONS})
    trainer = _trainer(qwen_dir, tmp_path, train=data, chat_template_path=str(path))
    text = trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    assert text.startswith("<|im_start|>USER\n")


# ---------------------------------------------------------------------------- packing


def test_packing_strategies_bfd_truncates_bfd_split_splits_wrapped_joins_end_to_end():
    ids = [list(range(1, 8)), [20, 21, 22], [30, 31]]
    labels = [list(r) for r in ids]

    bfd = pack_by_strategy([r[:4] for r in ids], [r[:4] for r in labels], 4, "bfd")
    assert sorted(map(len, bfd["input_ids"])) == [2, 3, 4]

    split = pack_by_strategy(ids, labels, 4, "bfd_split")
    every_token = sorted(t for row in ids for t in row)
    assert sorted(t for row in split["input_ids"] for t in row) == every_token
    assert all(len(row) <= 4 for row in split["input_ids"])
    # The long row's two pieces are sequences of their own (kept apart in attention).
    assert sorted(n for lengths in split["seq_lengths"] for n in lengths) == [2, 3, 3, 4]

    wrapped = pack_by_strategy(ids, labels, 4, "wrapped")
    assert wrapped["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 20], [21, 22, 30, 31]]
    # A row's first token is never a target (it would be predicted from the previous row).
    assert wrapped["labels"][1] == [5, 6, 7, -100] and wrapped["labels"][2][2] == -100
    assert "seq_lengths" not in wrapped


def test_wrapped_packing_trains_on_full_rows(qwen_dir, tmp_path):
    trainer = _trainer(qwen_dir, tmp_path, packing=True, packing_strategy="wrapped", max_length=8)
    assert all(len(row) == 8 for row in trainer.train_dataset["input_ids"][:-1])
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


# ---------------------------------------------------------------------------- preparation


def test_skip_prepare_dataset_hands_tokenized_rows_to_the_collator_as_they_are(qwen_dir, tmp_path):
    rows = Dataset.from_dict(
        {"input_ids": [[5, 6, 7, 8], [9, 10, 11]], "labels": [[-100, 6, 7, 8], [9, 10, -100]]}
    )
    trainer = _trainer(
        qwen_dir, tmp_path, train=rows, dataset_kwargs={"skip_prepare_dataset": True}
    )
    assert trainer.train_dataset is rows
    trainer.train()
    masked = Dataset.from_dict({"input_ids": [[5, 6, 7]], "completion_mask": [[0, 1, 1]]})
    with pytest.raises(ValueError, match="Add a 'labels' column"):
        _trainer(qwen_dir, tmp_path, train=masked, dataset_kwargs={"skip_prepare_dataset": True})


def test_pretokenized_rows_keep_all_their_tokens(qwen_dir, tmp_path):
    rows = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 9]], "completion_mask": [[0, 0, 1, 1, 0]]})
    trainer = _trainer(qwen_dir, tmp_path, train=rows)
    assert trainer.train_dataset[0]["input_ids"] == [5, 6, 7, 8, 9]
    assert trainer.train_dataset[0]["labels"] == [-100, -100, 7, 8, -100]


def test_input_checks_fail_with_clear_errors(qwen_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        SFTTrainer(model=model, args=_args(tmp_path))
    transformed = Dataset.from_dict({"text": TEXTS}).with_transform(lambda batch: batch)
    with pytest.raises(ValueError, match=r"with_transform\(\).*skip_prepare_dataset"):
        _trainer(qwen_dir, tmp_path, train=transformed)
    from peft import PromptTuningConfig

    with pytest.raises(ValueError, match="prompt-learning adapter"):
        _trainer(
            qwen_dir,
            tmp_path,
            packing=True,
            peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        )


def test_the_model_is_tagged_for_its_card_and_no_moe_aux_loss_is_claimed(qwen_dir, tmp_path):
    trainer = _trainer(qwen_dir, tmp_path)
    assert {"sft", "sft-pipeline"} <= set(trainer.model.model_tags)
    assert trainer.aux_loss_enabled is False


def test_qwen3_multi_turn_trains_every_assistant_turn_with_its_reasoning_block(
    fixtures_dir, tmp_path
):
    import json

    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = fixtures_dir / "tokenizers" / "chat_templates" / "qwen3__tokenizer_config.json"
    tokenizer.chat_template = json.loads(config.read_text())["chat_template"]
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    # The template itself drops the first turn's block once a later user turn follows.
    native = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert native.count("<think>") == 1
    data = Dataset.from_list([{"prompt": conversation[:1], "completion": conversation[1:]}])
    trainer = SFTTrainer(
        model=build_tiny_model("qwen3", len(tokenizer)),
        args=_args(tmp_path, assistant_only_loss=True, completion_only_loss=True, max_length=512),
        train_dataset=data,
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    text = tokenizer.decode(row["input_ids"])
    supervised = tokenizer.decode([t for t in row["labels"] if t >= 0])
    block = "<think>\n\n</think>\n\n"
    assert text.count(block) == 2
    assert supervised == f"{block}Paris.<|im_end|>{block}Rome.<|im_end|>"
    assert "And of Italy?" in text and "And of Italy?" not in supervised


def test_padding_free_with_max_length_and_no_packing_is_refused_naming_the_fixes(
    qwen_dir, tmp_path
):
    with pytest.raises(ValueError, match="`max_length` is not enforced") as error:
        _trainer(qwen_dir, tmp_path, padding_free=True, max_length=16)
    assert "packing=True" in str(error.value) and "padding_free_row_tokens" in str(error.value)
    packed = _trainer(qwen_dir, tmp_path, padding_free=True, packing=True, max_length=16)
    assert max(len(ids) for ids in packed.train_dataset["input_ids"]) <= 16


def test_padding_free_row_tokens_bounds_each_joined_row(qwen_dir, tmp_path):
    trainer = _trainer(
        qwen_dir,
        tmp_path,
        padding_free=True,
        max_length=None,
        padding_free_row_tokens=24,
        per_device_train_batch_size=4,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
    assert batch["input_ids"].shape[0] > 1
    assert batch["input_ids"].shape[1] <= max(24, longest)
    assert batch["document_ids"].max() <= 4


def test_padding_free_without_max_length_puts_each_batch_in_one_row(qwen_dir, tmp_path):
    trainer = _trainer(
        qwen_dir, tmp_path, padding_free=True, max_length=None, per_device_train_batch_size=4
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1
    assert batch["document_ids"].max() == 4  # the four rows, kept apart
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


@pytest.mark.parametrize("control", [{"weight": 0.5}, {"weight": 0}, {"train": False}])
def test_per_turn_train_or_weight_in_trainer_messages_is_refused_not_ignored(
    qwen_dir, tmp_path, control
):
    conversation = [dict(m) for m in CONVERSATIONS[0]]
    conversation[-1].update(control)
    with pytest.raises(ValueError, match=r"row 1: .*message 2 sets .*applies in the pipeline"):
        _trainer(qwen_dir, tmp_path, train=Dataset.from_dict({"messages": [conversation]}))
    conversation[-1].update(train=True, weight=1)  # what the turn does anyway: accepted
    trained = _trainer(qwen_dir, tmp_path, train=Dataset.from_dict({"messages": [conversation]}))
    assert len(trained.train_dataset) == 1
