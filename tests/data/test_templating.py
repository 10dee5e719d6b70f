"""Templating: segments, prefix checks, BOS handling, system prompts, template choice."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.data.templating import (
    ChatTemplateError,
    merge_system_into_first_user,
)
from tests.conftest import build_tiny_tokenizer
from tests.data.rows import render_messages, render_records, render_text

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def _joined(row: dict) -> str:
    return "".join(s["text"] for s in row["segments"])


def _supervised(row: dict) -> list[str]:
    return [s["text"] for s in row["segments"] if s["supervised"]]


def test_chatml_segments_cover_exact_rendering(tiny_tokenizer):
    row = render_messages(CONVERSATION, tiny_tokenizer, TemplateConfig())
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert _joined(row) == rendered
    assert _supervised(row) == ["Paris.<|im_end|>"]
    # The role header belongs to the prompt; the newline after <|im_end|> is not supervised.
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert row["segments"][-1] == {"text": "\n", "supervised": False}
    assert row["reference"] == "Paris."


def test_multi_turn_supervises_every_assistant_turn(tiny_tokenizer):
    messages = [
        *CONVERSATION,
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    row = render_messages(messages, tiny_tokenizer, TemplateConfig())
    assert _supervised(row) == ["Paris.<|im_end|>", "Madrid.<|im_end|>"]
    assert row["prompt"].endswith("And of Spain?<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris.<|im_end|>" in row["prompt"]
    assert row["reference"] == "Madrid."


def test_system_prompt_inserted_only_when_missing(tiny_tokenizer):
    cfg = TemplateConfig(system_prompt="Be brief.")
    row = render_messages(CONVERSATION, tiny_tokenizer, cfg)
    assert _joined(row).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    own = [{"role": "system", "content": "Be verbose."}, *CONVERSATION]
    row = render_messages(own, tiny_tokenizer, cfg)
    assert "Be verbose." in _joined(row)
    assert "Be brief." not in _joined(row)


def test_alpaca_template_appends_eos_and_system_preamble(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    row = render_messages(messages, tiny_tokenizer, TemplateConfig(chat_template="alpaca"))
    assert row["prompt"] == (
        "Be brief.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
    )
    assert _supervised(row) == ["Paris." + tiny_tokenizer.eos_token]


def test_template_without_end_of_turn_token_gets_eos(tmp_path, tiny_tokenizer):
    path = tmp_path / "plain.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    row = render_messages(CONVERSATION, tiny_tokenizer, TemplateConfig(chat_template=str(path)))
    assert _supervised(row) == ["Paris.<|im_end|>"]
    assert _joined(row).endswith("assistant: Paris.<|im_end|>\n")


def test_requiring_the_tokenizer_template_without_one_suggests_builtins(tiny_tokenizer):
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match=r"no chat template.*'auto'.*'chatml', 'hermes'"):
        render_messages(CONVERSATION, tok, TemplateConfig(chat_template="tokenizer"))


def test_unknown_template_name_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ChatTemplateError, match=r"nor an existing \.jinja file"):
        render_messages(CONVERSATION, tiny_tokenizer, TemplateConfig(chat_template="vicuna"))


def test_non_prefix_preserving_template_fails_naming_it(tmp_path, tiny_tokenizer):
    path = tmp_path / "counting.jinja"
    # The header depends on the number of messages, so earlier renderings are not prefixes.
    path.write_text(
        "{{ messages | length }} messages\n"
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"counting\.jinja.*not prefix-preserving"):
        render_messages(CONVERSATION, tiny_tokenizer, TemplateConfig(chat_template=str(path)))


def test_template_rewriting_content_fails(tmp_path, tiny_tokenizer):
    path = tmp_path / "upper.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="verbatim"):
        render_messages(CONVERSATION, tiny_tokenizer, TemplateConfig(chat_template=str(path)))


def test_system_role_merged_when_template_rejects_it(tiny_tokenizer, caplog):
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported')"
        " }}{% endif %}" + tok.chat_template
    )
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    records = _records([messages])
    with caplog.at_level("INFO", logger="sft_pipeline.data.rendering"):
        (row,) = render_records(records, tok, TemplateConfig())
    assert (
        "<|im_start|>user\nBe brief.\n\nWhat is the capital of France?<|im_end|>" in row["prompt"]
    )
    assert "merged the system prompt into the first user turn of 1 of 1" in caplog.text


def test_merge_system_into_first_user():
    merged = merge_system_into_first_user([{"role": "system", "content": "S"}, *CONVERSATION])
    assert merged[0] == {"role": "user", "content": "S\n\nWhat is the capital of France?"}
    assert merged[1:] == CONVERSATION[1:]


def test_text_record_is_supervised_with_eos(tiny_tokenizer):
    row = render_text("The quick brown fox.", tiny_tokenizer, TemplateConfig())
    assert row["segments"] == [{"text": "The quick brown fox.<|im_end|>", "supervised": True}]
    assert row["prompt"] == "" and row["reference"] == ""


def _records(conversations: list[list[dict]], texts: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for k, messages in enumerate(conversations):
        text = texts[k] if texts else ""
        rows.append(
            {
                "record_id": f"r{k}",
                "source_file": "data.jsonl",
                "source_row": k + 1,
                "format": "messages" if messages else "text",
                "messages": json.dumps(messages),
                "text": text,
                "raw": "{}",
            }
        )
    return pd.DataFrame(rows)


def test_render_records_keeps_ids_and_handles_text_rows(tiny_tokenizer):
    records = _records([CONVERSATION, []], texts=["", "Plain text."])
    rows = render_records(records, tiny_tokenizer, TemplateConfig())
    assert [r["record_id"] for r in rows] == ["r0", "r1"]
    assert _supervised(rows[1]) == ["Plain text.<|im_end|>"]


def test_render_records_error_names_file_and_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "broken.jinja"
    path.write_text("{{ raise_exception('nope') }}")
    with pytest.raises(ChatTemplateError, match=r"data\.jsonl, row 1 \(record r0\).*nope"):
        render_records(
            _records([CONVERSATION]), tiny_tokenizer, TemplateConfig(chat_template=str(path))
        )
