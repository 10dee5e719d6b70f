"""TRL's dataset types in our SFTTrainer: the same input_ids and labels as TRL 1.16 per type.

Where our label rule differs on purpose (data_prep's module doc), the comparison says so: we
never train on a template's text after the end-of-turn token and end rows at their last
supervised token, so there TRL's row must equal ours followed only by that tail.
"""

from __future__ import annotations

import pytest
from datasets import Dataset, IterableDataset

from sft_pipeline.trainer import SFTConfig, SFTTrainer

# ChatML with generation markers around what the assistant says and its <|im_end|>, which TRL's
# assistant_only_loss needs; rendering is the same as the tiny tokenizer's own template.
CHATML_WITH_MARKERS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTIONS = ["What is the capital of France?", "Convert the record to JSON: Alice, 31."]
ANSWERS = ["Paris is the capital of France.", '{"name": "Alice", "age": 31}']


def _messages(k: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": QUESTIONS[k]},
        {"role": "assistant", "content": ANSWERS[k]},
        {"role": "user", "content": "Answer briefly and correctly."},
        {"role": "assistant", "content": ANSWERS[1 - k]},
    ]


ROWS = {
    "text": [{"text": f"The quick brown fox jumps over the lazy dog {k}."} for k in range(4)],
    "prompt-completion": [
        {"prompt": q, "completion": " " + a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ],
    "conversational-prompt-completion": [
        {"prompt": _messages(k)[:4], "completion": _messages(k)[4:]} for k in range(2)
    ],
    "messages": [{"messages": _messages(k)} for k in range(2)],
}


@pytest.fixture(scope="module")
def setup():
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHATML_WITH_MARKERS
    return build_tiny_model("llama", len(tokenizer)), tokenizer


def _common(tmp_path, **extra) -> dict:
    return {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "use_cpu": True,
        "max_length": 256,
        **extra,
    }


def trl_rows(setup, tmp_path, data, formatting_func=None, **extra) -> list[tuple[list, list]]:
    pytest.importorskip("trl", reason="TRL is a benchmark-only extra")
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    model, tokenizer = setup
    trainer = TRLTrainer(
        model=model,
        args=TRLConfig(bf16=False, **_common(tmp_path / "trl", **extra)),
        train_dataset=Dataset.from_list(data) if isinstance(data, list) else data,
        processing_class=tokenizer,
        formatting_func=formatting_func,
    )
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


def our_rows(setup, tmp_path, data, formatting_func=None, **extra) -> list[tuple[list, list]]:
    model, tokenizer = setup
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**_common(tmp_path / "ours", **extra)),
        train_dataset=Dataset.from_list(data) if isinstance(data, list) else data,
        processing_class=tokenizer,
        formatting_func=formatting_func,
    )
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]


def assert_equal_up_to_unsupervised_tail(theirs, ours, tokenizer, supervised_tail=False):
    """Ours is TRL's row without what follows the last end-of-turn token (whitespace)."""
    assert len(theirs) == len(ours)
    for (t_ids, t_labels), (o_ids, o_labels) in zip(theirs, ours, strict=True):
        n = len(o_ids)
        assert t_ids[:n] == o_ids and t_labels[:n] == o_labels
        assert tokenizer.decode(t_ids[n:]).strip() == ""
        tail = set(t_labels[n:])
        assert tail == ({*t_ids[n:]} if supervised_tail else {-100}) or not tail


@pytest.mark.parametrize("kind", ["text", "prompt-completion"])
def test_strings_match_trl(setup, tmp_path, kind):
    assert our_rows(setup, tmp_path, ROWS[kind]) == trl_rows(setup, tmp_path, ROWS[kind])


def test_prompt_completion_loss_on_every_token_matches_trl(setup, tmp_path):
    data = ROWS["prompt-completion"]
    ours = our_rows(setup, tmp_path, data, completion_only_loss=False)
    assert ours == trl_rows(setup, tmp_path, data, completion_only_loss=False)
    assert all(ids == labels for ids, labels in ours)


def test_dataset_text_field_matches_trl(setup, tmp_path):
    data = [{"content": row["text"]} for row in ROWS["text"]]
    ours = our_rows(setup, tmp_path, data, dataset_text_field="content")
    assert ours == trl_rows(setup, tmp_path, data, dataset_text_field="content")


def test_formatting_func_matches_trl_and_may_work_on_batches(setup, tmp_path):
    data = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]

    def per_row(row):
        return f"Q: {row['question']}\nA: {row['answer']}"

    def per_batch(batch):  # older TRL's style: a batch in, one string per row out
        pairs = zip(batch["question"], batch["answer"], strict=True)
        return [f"Q: {q}\nA: {a}" for q, a in pairs]

    ours = our_rows(setup, tmp_path, data, formatting_func=per_row)
    assert ours == trl_rows(setup, tmp_path, data, formatting_func=per_row)
    assert our_rows(setup, tmp_path, data, formatting_func=per_batch) == ours


def test_conversational_prompt_completion_matches_trl_up_to_the_newline_after_the_turn(
    setup, tmp_path
):
    """TRL supervises everything after the prompt, ChatML's trailing newline included."""
    data = ROWS["conversational-prompt-completion"]
    ours = our_rows(setup, tmp_path, data)
    theirs = trl_rows(setup, tmp_path, data)
    assert_equal_up_to_unsupervised_tail(theirs, ours, setup[1], supervised_tail=True)
    tokenizer = setup[1]
    # Only the completion's turn: the assistant turn inside the prompt is not supervised.
    supervised = [tokenizer.decode([t for t in labels if t != -100]) for _, labels in ours]
    assert supervised == [ANSWERS[1] + "<|im_end|>", ANSWERS[0] + "<|im_end|>"]


def test_messages_train_assistant_turns_like_trl_assistant_only_loss(setup, tmp_path):
    data = ROWS["messages"]
    ours = our_rows(setup, tmp_path, data)  # assistant turns by default
    theirs = trl_rows(setup, tmp_path, data, assistant_only_loss=True)
    assert_equal_up_to_unsupervised_tail(theirs, ours, setup[1])
    assert our_rows(setup, tmp_path, data, assistant_only_loss=True) == ours


def test_messages_on_every_token_match_trl_default(setup, tmp_path):
    data = ROWS["messages"]
    ours = our_rows(setup, tmp_path, data, assistant_only_loss=False)
    assert ours == trl_rows(setup, tmp_path, data)
    assert all(ids == labels for ids, labels in ours)


@pytest.mark.parametrize("column", ["labels", "completion_mask"])
def test_pretokenized_rows_match_trl(setup, tmp_path, column):
    ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
    values = {
        "labels": [[-100, -100, 7, 8, 9], [-100, 11, 12]],
        "completion_mask": [[0, 0, 1, 1, 1], [0, 1, 1]],
    }[column]
    data = [{"input_ids": i, column: v} for i, v in zip(ids, values, strict=True)]
    ours = our_rows(setup, tmp_path, data)
    # TRL 1.16 applies a completion_mask only when asked to; we apply it by default.
    assert ours == trl_rows(setup, tmp_path, data, completion_only_loss=True)
    assert ours[0][1] == [-100, -100, 7, 8, 9]


def test_streamed_dataset_gives_the_same_rows_and_trains_with_max_steps(setup, tmp_path):
    data = ROWS["messages"] * 3
    stream = IterableDataset.from_generator(lambda: iter(data))
    model, tokenizer = setup
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **_common(tmp_path, max_steps=2, per_device_train_batch_size=2, logging_steps=1)
        ),
        train_dataset=stream,
        processing_class=tokenizer,
    )
    rows = [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
    assert rows == our_rows(setup, tmp_path, data)
    trainer.train()
    assert trainer.state.global_step == 2


def test_streamed_dataset_packs(setup, tmp_path):
    data = ROWS["text"] * 4
    model, tokenizer = setup
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**_common(tmp_path, max_steps=1, packing=True, max_length=64)),
        train_dataset=IterableDataset.from_generator(lambda: iter(data)),
        processing_class=tokenizer,
    )
    rows = list(trainer.train_dataset)
    assert len(rows) < len(data) and all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(len(r["seq_lengths"]) for r in rows) == len(data)
    trainer.train()


def test_eval_datasets_by_name_report_metrics_under_their_names(setup, tmp_path):
    model, tokenizer = setup
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**_common(tmp_path, max_steps=1)),
        train_dataset=Dataset.from_list(ROWS["messages"]),
        eval_dataset={
            "chat": Dataset.from_list(ROWS["messages"]),
            "prose": Dataset.from_list(ROWS["text"]),
        },
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    for name in ("chat", "prose"):
        for key in ("loss", "mean_token_accuracy", "supervised_tokens"):
            assert f"eval_{name}_{key}" in metrics
    assert metrics["eval_chat_loss"] != metrics["eval_prose_loss"]


def test_loss_flags_that_do_not_fit_the_data_are_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="assistant_only_loss=True needs conversational"):
        our_rows(setup, tmp_path, ROWS["text"], assistant_only_loss=True)
    with pytest.raises(ValueError, match="completion_only_loss=True needs prompt-completion"):
        our_rows(setup, tmp_path, ROWS["text"], completion_only_loss=True)


@pytest.mark.parametrize("kind", ["text", "prompt-completion"])
def test_strings_on_the_llama2_base_tokenizer_match_trl(fixtures_dir, tmp_path, kind):
    """A SentencePiece tokenizer with a BOS and no chat template (the seed's base model)."""
    from transformers import AutoTokenizer

    from tests.conftest import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(str(fixtures_dir / "tokenizers" / "llama-2"))
    setup = (build_tiny_model("llama", len(tokenizer), pad_token_id=None), tokenizer)
    ours = our_rows(setup, tmp_path, ROWS[kind])
    assert ours == trl_rows(setup, tmp_path, ROWS[kind])
    assert all(ids[0] == tokenizer.bos_token_id for ids, _ in ours)
