"""Reasoning and multi-turn conversations are trained as the model will be prompted: with the
real Qwen3, SmolLM3 and gpt-oss templates, every trained row's prompt tokens are exactly what
`apply_chat_template(history, add_generation_prompt=True)` gives for that turn, the turn's
reasoning, answer and end-of-turn token are its only labels, and a record with reasoning is
never trained without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.common.labels import IGNORE_INDEX
from sft_pipeline.data.chat_templates import ChatTemplateError, pinned_clock
from sft_pipeline.data.templating import Renderer
from sft_pipeline.data.tokenization import Outcome, tokenize_batch
from sft_pipeline.data.turn_rows import record_rows
from tests.data.test_tool_templates import _fixture_template, _gpt2

THREE_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12.", "reasoning_content": "Four times three."},
    {"role": "user", "content": "Minus 5?"},
    {"role": "assistant", "content": "7.", "reasoning_content": "Twelve less five."},
]


def _jinja(fixtures_dir: Path, name: str) -> str:
    return (fixtures_dir / "tokenizers" / "chat_templates" / name).read_text()


@pytest.fixture
def qwen3(fixtures_dir):
    tokenizer = _gpt2(fixtures_dir, ["<|im_start|>", "<|im_end|>"], added=("<think>", "</think>"))
    tokenizer.chat_template = _fixture_template(fixtures_dir, "qwen3__tokenizer_config.json")
    return tokenizer


@pytest.fixture
def smollm3(fixtures_dir):
    tokenizer = _gpt2(fixtures_dir, ["<|im_start|>", "<|im_end|>"], added=("<think>", "</think>"))
    tokenizer.chat_template = _jinja(fixtures_dir, "smollm3__chat_template.jinja")
    return tokenizer


@pytest.fixture
def gpt_oss(fixtures_dir):
    specials = ["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>"]
    tokenizer = _gpt2(fixtures_dir, specials)
    tokenizer.chat_template = _jinja(fixtures_dir, "gpt-oss__chat_template.jinja")
    return tokenizer


def _tokens(rows, tokenizer):
    table = tokenize_batch(
        [{"record_id": "r", **row} for row in rows], tokenizer, 100_000, Outcome()
    )
    return table["input_ids"].to_pylist(), table["labels"].to_pylist()


def _inference_prompt(tokenizer, history, cfg: TemplateConfig, **kwargs) -> list[int]:
    """What a chat client feeds the model for `history`: the template's own rendering with the
    generation prompt, on the same pinned day."""
    with pinned_clock(tokenizer.chat_template, cfg.date):
        text = tokenizer.apply_chat_template(
            history, add_generation_prompt=True, tokenize=False, **kwargs
        )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _assert_trained_as_prompted(tokenizer, messages, rows, turns, cfg, expected, **kwargs):
    """Each row: prompt ids equal inference's for its turn's history, then exactly the turn's
    expected supervised text labelled position by position, nothing after it labelled."""
    ids, labels = _tokens(rows, tokenizer)
    assert [row["turn"] for row in rows] == [t + 1 for t in turns]
    for row_ids, row_labels, turn, text in zip(ids, labels, turns, expected, strict=True):
        prompt = _inference_prompt(tokenizer, messages[:turn], cfg, **kwargs)
        assert row_ids[: len(prompt)] == prompt
        answer = tokenizer(text, add_special_tokens=False)["input_ids"]
        end = len(prompt) + len(answer)
        assert row_ids[len(prompt) : end] == answer
        assert row_labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert row_labels[len(prompt) : end] == answer
        assert set(row_labels[end:]) <= {IGNORE_INDEX}


def test_a_qwen3_conversation_with_three_assistant_turns_trains_as_three_rows_as_prompted(qwen3):
    cfg = TemplateConfig()
    rows = record_rows(Renderer(qwen3, cfg), THREE_TURNS)
    assert len(rows) == 3
    expected = [
        f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}<|im_end|>"
        for m in THREE_TURNS[1::2]
    ]
    _assert_trained_as_prompted(qwen3, THREE_TURNS, rows, [1, 3, 5], cfg, expected)
    # Evaluation scores their answers alone and whether generations close the reasoning.
    assert [(row["reasoning"], row["reference"]) for row in rows] == [
        (True, "4."),
        (True, "12."),
        (True, "7."),
    ]


def test_whole_on_a_template_that_drops_earlier_reasoning_is_refused_naming_it_and_per_turn(qwen3):
    with pytest.raises(ChatTemplateError) as caught:
        record_rows(Renderer(qwen3, TemplateConfig(multi_turn="whole")), THREE_TURNS)
    message = str(caught.value)
    assert message.startswith("the chat template of tokenizer ")
    assert "is not prefix-preserving" in message
    assert "template.multi_turn: per_turn" in message


def test_multi_turn_last_trains_only_the_last_turn(qwen3):
    rows = record_rows(Renderer(qwen3, TemplateConfig(multi_turn="last")), THREE_TURNS)
    assert [row["turn"] for row in rows] == [6]
    supervised = "".join(s["text"] for s in rows[0]["segments"] if s["supervised"])
    assert supervised == "<think>\nTwelve less five.\n</think>\n\n7.<|im_end|>"


def test_a_single_turn_qwen3_record_trains_reasoning_answer_and_end_of_turn(qwen3):
    messages = THREE_TURNS[:2]
    cfg = TemplateConfig()
    rows = record_rows(Renderer(qwen3, cfg), messages)
    # One trained turn: the ordinary single row, labelled position by position all the same.
    ids, labels = _tokens(rows, qwen3)
    prompt = _inference_prompt(qwen3, messages[:1], cfg)
    answer = qwen3(
        "<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>", add_special_tokens=False
    )["input_ids"]
    assert ids[0][: len(prompt)] == prompt
    assert labels[0] == [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX]


def test_enable_thinking_false_reaches_the_template_and_the_empty_block_is_prompt(qwen3):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    cfg = TemplateConfig(enable_thinking=False)
    rows = record_rows(Renderer(qwen3, cfg), messages)
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    supervised = "".join(s["text"] for s in rows[0]["segments"] if s["supervised"])
    assert supervised == "Hello.<|im_end|>"
    ids, _labels = _tokens(rows, qwen3)
    prompt = _inference_prompt(qwen3, messages[:1], cfg, enable_thinking=False)
    assert ids[0][: len(prompt)] == prompt


def test_smollm3_takes_reasoning_inline_and_each_turn_is_prompted_as_at_inference(smollm3):
    cfg = TemplateConfig()
    rows = record_rows(Renderer(smollm3, cfg), THREE_TURNS)
    expected = [
        f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}<|im_end|>"
        for m in THREE_TURNS[1::2]
    ]
    # At inference the history goes back without reasoning: SmolLM3's template never reads it.
    _assert_trained_as_prompted(smollm3, THREE_TURNS, rows, [1, 3, 5], cfg, expected)
    assert [row["reference"] for row in rows] == ["4.", "12.", "7."]


def test_gpt_oss_multi_turn_labels_position_by_position(gpt_oss):
    messages = [m for m in (dict(m) for m in THREE_TURNS)]
    for m in messages:
        m.pop("reasoning_content", None)
    cfg = TemplateConfig()
    rows = Renderer(gpt_oss, cfg).row(messages)
    ids, labels = _tokens([rows], gpt_oss)
    # Its template keeps earlier turns as rendered: one row, every assistant turn trained.
    for turn, answer in ((1, "4."), (3, "12."), (5, "7.")):
        prompt = _inference_prompt(gpt_oss, messages[:turn], cfg)
        assert ids[0][: len(prompt)] == prompt
        body = gpt_oss(f"<|message|>{answer}<|end|>", add_special_tokens=False)["input_ids"]
        assert labels[0][len(prompt) : len(prompt) + len(body)] == body
        assert set(labels[0][: len(prompt)]) - {IGNORE_INDEX} <= set(
            gpt_oss("<|message|>4.<|end|><|message|>12.<|end|>", add_special_tokens=False)[
                "input_ids"
            ]
        )
    supervised = np.asarray(labels[0]) != IGNORE_INDEX
    assert gpt_oss.decode(np.asarray(ids[0])[supervised]) == (
        "<|message|>4.<|end|><|message|>12.<|end|><|message|>7.<|end|>"
    )


@pytest.mark.parametrize("template", ["gpt_oss", "chatml"])
def test_a_record_with_reasoning_is_never_trained_without_it(request, qwen3, template):
    if template == "gpt_oss":
        renderer = Renderer(request.getfixturevalue("gpt_oss"), TemplateConfig())
    else:
        renderer = Renderer(qwen3, TemplateConfig(chat_template="chatml"))
    with pytest.raises(ChatTemplateError, match="would be trained without its reasoning"):
        record_rows(renderer, THREE_TURNS[:2])


def test_enable_thinking_false_on_a_record_with_reasoning_is_refused(qwen3):
    renderer = Renderer(qwen3, TemplateConfig(enable_thinking=False))
    with pytest.raises(ChatTemplateError, match=r"template\.enable_thinking is false"):
        record_rows(renderer, THREE_TURNS[:2])


@pytest.mark.parametrize("control", [{"train": False}, {"weight": 0}])
def test_a_turn_marked_context_only_is_not_supervised(qwen3, control):
    messages = [dict(m) for m in THREE_TURNS]
    messages[3] |= control
    # Per turn (Qwen3): no row for it; in one row (ChatML): its text is context.
    rows = record_rows(Renderer(qwen3, TemplateConfig()), messages)
    assert [row["turn"] for row in rows] == [2, 6]
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    row = record_rows(Renderer(qwen3, TemplateConfig(chat_template="chatml")), plain)
    assert len(row) == 1 and "turn" not in row[0]
    supervised = [s["text"] for s in row[0]["segments"] if s["supervised"]]
    assert supervised == ["4.<|im_end|>", "7.<|im_end|>"]
    assert not any(k in json.dumps(row[0]) for k in ('"train"', '"weight"'))


def test_the_render_node_writes_one_row_per_trained_turn_each_with_its_record_id(tmp_path, qwen3):
    from sft_pipeline.common.config import DataConfig
    from tests.data.rows import ingest, render_records

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": THREE_TURNS}) + "\n")
    records = ingest(DataConfig(path=str(path)))
    rows = render_records(records, qwen3, TemplateConfig())
    assert [(row["record_id"], row["turn"]) for row in rows] == [
        (records["record_id"][0], turn) for turn in (2, 4, 6)
    ]


WEIGHTED = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "weight": 0.5},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12.", "weight": 2},
]


def _weighted_tokens(rows, tokenizer):
    table = tokenize_batch(
        [{"record_id": "r", **row} for row in rows], tokenizer, 100_000, Outcome(), weighted=True
    )
    return [table[c].to_pylist() for c in ("input_ids", "labels", "loss_weights")]


def _without_control(messages):
    return [{k: v for k, v in m.items() if k not in ("train", "weight")} for m in messages]


def test_turn_weights_label_position_by_position_and_weigh_exactly_the_supervised_tokens(qwen3):
    renderer = Renderer(qwen3, TemplateConfig(chat_template="chatml"))
    rows = record_rows(renderer, WEIGHTED)
    assert len(rows) == 1
    ids, labels, weights = (column[0] for column in _weighted_tokens(rows, qwen3))
    expected_labels = [IGNORE_INDEX] * len(ids)
    expected_weights = [0.0] * len(ids)
    plain = _without_control(WEIGHTED)
    for turn, answer, weight in ((1, "4.<|im_end|>", 0.5), (3, "12.<|im_end|>", 2.0)):
        prompt = qwen3(renderer.render(plain[:turn], True), add_special_tokens=False)["input_ids"]
        body = qwen3(answer, add_special_tokens=False)["input_ids"]
        span = slice(len(prompt), len(prompt) + len(body))
        assert ids[: len(prompt)] == prompt and ids[span] == body
        expected_labels[span] = body
        expected_weights[span] = [weight] * len(body)
    assert labels == expected_labels
    assert weights == expected_weights
    # The weight travels on the supervised segments only; the control keys never render.
    assert [(s["text"], s.get("weight")) for s in rows[0]["segments"] if s["supervised"]] == [
        ("4.<|im_end|>", 0.5),
        ("12.<|im_end|>", 2.0),
    ]


def test_per_turn_rows_each_carry_their_turns_weight(qwen3):
    messages = [dict(m) for m in THREE_TURNS]
    messages[1]["weight"], messages[5]["weight"] = 0.5, 2
    rows = record_rows(Renderer(qwen3, TemplateConfig()), messages)
    _ids, labels, weights = _weighted_tokens(rows, qwen3)
    for row_labels, row_weights, weight in zip(labels, weights, (0.5, 1.0, 2.0), strict=True):
        supervised = np.asarray(row_labels) != IGNORE_INDEX
        assert supervised.any() and not supervised.all()
        assert set(np.asarray(row_weights)[supervised]) == {weight}
        assert set(np.asarray(row_weights)[~supervised]) == {0.0}
    assert "weight" not in json.dumps(rows[1])


def test_the_weight_column_exists_only_for_data_that_weights_a_turn(tmp_path, qwen3):
    from sft_pipeline.common.config import TokenizationConfig
    from sft_pipeline.data.streams import JSONLines, json_line
    from sft_pipeline.data.tokenization import FEATURES, tokenize_texts, weighted_rows

    renderer = Renderer(qwen3, TemplateConfig(chat_template="chatml"))
    plain = [{"record_id": "a", **record_rows(renderer, _without_control(WEIGHTED))[0]}]
    weighted = [{"record_id": "b", **record_rows(renderer, WEIGHTED)[0]}]
    cfg = TokenizationConfig(max_seq_length=512)
    assert list(tokenize_texts(plain, qwen3, cfg)[0].features) == list(FEATURES)
    tokens = tokenize_texts(plain + weighted, qwen3, cfg)[0]
    assert list(tokens.features) == [*FEATURES, "loss_weights"]
    # The row without weights trains every supervised token at 1.
    supervised = np.asarray(tokens[0]["labels"]) != IGNORE_INDEX
    assert set(np.asarray(tokens[0]["loss_weights"])[supervised]) == {1.0}
    # A JSON Lines file: a tool call's argument named `weight` is not a turn weight.
    path = tmp_path / "texts.jsonl"
    path.write_text(json_line({**plain[0], "tool_call": {"reference": [{"weight": 3}]}}))
    assert weighted_rows(JSONLines(path)) is False
    path.write_text(path.read_text() + json_line(weighted[0]))
    assert weighted_rows(JSONLines(path)) is True


def test_roles_to_train_user_supervises_the_user_turns_content_and_end_of_turn(qwen3):
    renderer = Renderer(qwen3, TemplateConfig(chat_template="chatml"))
    plain = _without_control(WEIGHTED)
    rows = record_rows(renderer, plain, roles=("assistant", "user"))
    assert [s["text"] for s in rows[0]["segments"] if s["supervised"]] == [
        "What is 2+2?<|im_end|>",
        "4.<|im_end|>",
        "And times 3?<|im_end|>",
        "12.<|im_end|>",
    ]
    ids, labels = _tokens(rows, qwen3)
    # The same text and ids as without user turns trained; only the labels differ.
    assert ids == _tokens(record_rows(renderer, plain), qwen3)[0]
    supervised = np.asarray(labels[0]) != IGNORE_INDEX
    assert np.array_equal(np.asarray(labels[0])[supervised], np.asarray(ids[0])[supervised])
    assert qwen3.decode(np.asarray(ids[0])[supervised]) == (
        "What is 2+2?<|im_end|>4.<|im_end|>And times 3?<|im_end|>12.<|im_end|>"
    )


def test_per_turn_rows_train_each_user_turn_once_with_the_turn_it_leads_to(qwen3):
    messages = [dict(m) for m in THREE_TURNS]
    messages[2]["train"] = False  # context only, as for an assistant turn
    rows = record_rows(Renderer(qwen3, TemplateConfig()), messages, roles=("assistant", "user"))
    supervised = [[s["text"] for s in row["segments"] if s["supervised"]] for row in rows]
    assert supervised == [
        ["What is 2+2?<|im_end|>", "<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"],
        ["<think>\nFour times three.\n</think>\n\n12.<|im_end|>"],
        ["Minus 5?<|im_end|>", "<think>\nTwelve less five.\n</think>\n\n7.<|im_end|>"],
    ]
    # Every row's prompt is still exactly what inference gives for its turn, and its labels
    # are exactly the supervised texts.
    ids, labels = _tokens(rows, qwen3)
    for row_ids, row_labels, turn, texts in zip(ids, labels, [1, 3, 5], supervised, strict=True):
        prompt = _inference_prompt(qwen3, _without_control(messages[:turn]), TemplateConfig())
        assert row_ids[: len(prompt)] == prompt
        trained = np.asarray(row_labels) != IGNORE_INDEX
        assert qwen3.decode(np.asarray(row_ids)[trained]) == "".join(texts)


def test_a_template_that_tests_user_content_is_refused_for_roles_to_train_user(fixtures_dir):
    tokenizer = _gpt2(fixtures_dir, ["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['content'].startswith('!') %}[command]{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "!ping"}, {"role": "assistant", "content": "pong"}]
    renderer = Renderer(tokenizer, TemplateConfig())
    assert record_rows(renderer, messages)[0]["segments"][0]["text"].startswith("[command]")
    with pytest.raises(ChatTemplateError, match=r"renders the user turns differently"):
        record_rows(renderer, messages, roles=("assistant", "user"))


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["assistant", "users"], "training.roles_to_train.1: Input should be 'assistant', 'user'"),
        (["user"], "leaves the assistant turns untrained"),
    ],
)
def test_roles_to_train_names_the_key_and_the_allowed_roles(roles, expected):
    from sft_pipeline.common.config import ConfigError, TrainingConfig, parse_section

    with pytest.raises(ConfigError) as caught:
        parse_section(TrainingConfig, {"roles_to_train": roles}, "training")
    assert expected in str(caught.value)
    assert "'system'" in str(caught.value)
    assert parse_section(TrainingConfig, {}, "training").roles_to_train == ["assistant"]


def test_the_render_node_supervises_the_roles_it_is_given(tmp_path, qwen3):
    from sft_pipeline.common.config import DataConfig
    from sft_pipeline.data.rendering import render_stream
    from tests.data.rows import ingest

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": WEIGHTED}) + "\n")
    records = ingest(DataConfig(path=str(path)))
    cfg = TemplateConfig(chat_template="chatml")
    rows = list(render_stream(records, qwen3, cfg, roles=["assistant", "user"]))
    assert [(s["text"], s.get("weight")) for s in rows[0]["segments"] if s["supervised"]] == [
        ("What is 2+2?<|im_end|>", None),
        ("4.<|im_end|>", 0.5),
        ("And times 3?<|im_end|>", None),
        ("12.<|im_end|>", 2.0),
    ]
    # The next rendering, without the parameter, trains the assistant turns alone.
    assert (
        sum(s["supervised"] for s in next(iter(render_stream(records, qwen3, cfg)))["segments"])
        == 2
    )
