"""Reasoning as data on the way in: whichever way a record writes it (`reasoning_content`,
gpt-oss `thinking`, `<think>...</think>` at the start of the content) the canonical record keeps
it apart from the answer, and validation names what cannot be trained: an unclosed tag,
reasoning outside assistant turns, an empty answer after the reasoning, unusable per-turn
control."""

from __future__ import annotations

import json

import pytest

from sft_pipeline.common.config import DataConfig, ValidationConfig
from sft_pipeline.data.validation import validate_stream
from tests.data.rows import ingest


def _records(tmp_path, *conversations, **data):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return ingest(DataConfig(path=str(path), **data))


def _messages(records, k=0):
    return json.loads(records["messages"][k])


def _reasons(records, tags=("<think>", "</think>")):
    _valid, rejected, report = validate_stream(
        records, ValidationConfig(max_rejected_fraction=1.0), tags
    )
    return [reason for row in rejected for reason in row["reasons"]], report


def _ask(answer: dict) -> list[dict]:
    return [{"role": "user", "content": "2+2?"}, {"role": "assistant", **answer}]


@pytest.mark.parametrize(
    "answer",
    [
        {"content": "4", "reasoning_content": "Two and two."},
        {"content": "4", "thinking": "Two and two."},
        {"content": "<think>\nTwo and two.\n</think>\n\n4"},
    ],
    ids=["reasoning_content", "thinking", "think_tags"],
)
def test_every_way_of_writing_reasoning_reaches_the_record_apart_from_the_answer(tmp_path, answer):
    records = _records(tmp_path, _ask(answer))
    assert _messages(records)[1] == {
        "role": "assistant",
        "content": "4",
        "reasoning_content": "Two and two.",
    }
    assert _reasons(records)[0] == []


def test_data_reasoning_tags_name_the_tags_the_data_uses(tmp_path):
    answer = {"content": "<reasoning>Two and two.</reasoning>4"}
    records = _records(tmp_path, _ask(answer), reasoning_tags=("<reasoning>", "</reasoning>"))
    assert _messages(records)[1]["reasoning_content"] == "Two and two."
    assert _messages(records)[1]["content"] == "4"


def test_validation_names_an_unclosed_tag_reasoning_outside_assistant_turns_and_an_empty_answer(
    tmp_path,
):
    records = _records(
        tmp_path,
        _ask({"content": "<think>Two and two... 4"}),
        [
            {"role": "user", "content": "2+2?", "reasoning_content": "hmm"},
            {"role": "assistant", "content": "4"},
        ],
        _ask({"content": "", "reasoning_content": "Two and two."}),
        _ask({"content": "<think>Two and two.</think>\n  "}),
    )
    reasons, report = _reasons(records)
    assert reasons == [
        "unclosed_reasoning: message 2 (assistant) opens its reasoning with '<think>' and never "
        "closes it with '</think>'",
        "reasoning_outside_assistant: message 1 (user) carries reasoning (reasoning_content); "
        "only assistant turns reason",
        "empty_answer: message 2 (assistant) has reasoning but an empty answer after it",
        "empty_answer: message 2 (assistant) has reasoning but an empty answer after it",
    ]
    assert report["rejected"] == 4 and report["valid"] == 0
    assert report["reasons"] == {
        "empty_answer": 2,
        "reasoning_outside_assistant": 1,
        "unclosed_reasoning": 1,
    }


def test_per_turn_control_that_cannot_be_honoured_is_a_reason(tmp_path):
    two_turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "train": False},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye.", "weight": 0},
    ]
    records = _records(
        tmp_path,
        _ask({"content": "4", "weight": -0.5}),
        _ask({"content": "4", "train": "no"}),
        two_turns,
        [{"role": "user", "content": "Hi", "weight": 1}, {"role": "assistant", "content": "4"}],
        _ask({"content": "4", "train": True, "weight": 1}),
        _ask({"content": "4", "weight": "heavy"}),
        [{"role": "user", "content": "Hi", "weight": 0.5}, {"role": "assistant", "content": "4"}],
    )
    reasons, report = _reasons(records)
    expected = "expected a finite number >= 0 (0: context only; any other scales the turn's loss)"
    assert reasons == [
        f"bad_turn_control: message 2 (assistant): weight is -0.5, {expected}",
        "bad_turn_control: message 2 (assistant): train is 'no', expected true or false",
        "no_trained_turn: every assistant turn is context only (train: false or weight: 0)",
        "bad_turn_control: message 1 (user): only assistant turns train (train/weight)",
        "bad_turn_control: message 2 (assistant): weight is 'heavy', expected a number",
        "bad_turn_control: message 1 (user): only assistant turns train (train/weight)",
    ]
    assert report["valid"] == 1


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1])
def test_a_weight_that_is_not_finite_or_negative_is_a_reason(tmp_path, weight):
    # JSON Lines written by Python's json module spell these NaN and Infinity.
    reasons, _report = _reasons(_records(tmp_path, _ask({"content": "4", "weight": weight})))
    assert reasons == [
        f"bad_turn_control: message 2 (assistant): weight is {weight!r}, expected a finite "
        "number >= 0 (0: context only; any other scales the turn's loss)"
    ]


def test_weights_that_scale_a_turn_are_kept_on_the_canonical_record(tmp_path):
    records = _records(
        tmp_path, _ask({"content": "4", "weight": 0.5}), _ask({"content": "4", "weight": 2})
    )
    reasons, report = _reasons(records)
    assert reasons == [] and report["valid"] == 2
    assert [_messages(records, k)[1]["weight"] for k in (0, 1)] == [0.5, 2]
