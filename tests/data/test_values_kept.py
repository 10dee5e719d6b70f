"""Values are kept as found or refused with a reason, never altered on the way in: bytes are not
text, the per-message keys templates read reach the template, and the keys no template reads are
counted in the validation report rather than dropped without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft_pipeline.common.config import DataConfig, TemplateConfig, ValidationConfig
from sft_pipeline.data.templating import Renderer
from tests.conftest import build_tiny_tokenizer
from tests.data.rows import ingest, render_records, validate
from tests.data.test_tool_templates import _fixture_template, _gpt2


def _reasons(rejected: list[dict]) -> list[str]:
    return [reason for row in rejected for reason in row["reasons"]]


def test_a_bytes_value_in_a_text_field_is_refused_not_turned_into_its_repr(tmp_path):
    path = tmp_path / "pairs.parquet"
    table = pa.table(
        {
            "prompt": pa.array(["Capital of France?", "Capital of Italy?"]),
            "response": pa.array([b"Paris", b"Rome"], type=pa.binary()),
        }
    )
    pq.write_table(table, path)
    records = ingest(DataConfig(path=str(path)))
    assert not isinstance(json.loads(records["messages"][0])[1]["content"], str)
    valid, rejected, report = validate(records, ValidationConfig(max_rejected_fraction=1.0))
    assert valid.empty and len(rejected) == 2
    reasons = _reasons(rejected)
    assert any(
        r.startswith("unsupported_value: message 2 (assistant): content is bytes") for r in reasons
    ), reasons
    assert any("content is not a string (got bytes)" in r for r in reasons), reasons
    assert report["reasons"]["unsupported_value"] == 2


def test_bytes_inside_tool_call_arguments_are_refused(tmp_path):
    path = tmp_path / "agent.parquet"
    call = {"name": "get_weather", "arguments": {"city": b"Paris"}}
    messages = [
        {"role": "user", "content": "Weather?", "tool_calls": None},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": call}],
        },
        {"role": "tool", "content": "21", "tool_calls": None},
        {"role": "assistant", "content": "21 degrees.", "tool_calls": None},
    ]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), path)
    records = ingest(DataConfig(path=str(path)))
    _valid, rejected, _report = validate(records, ValidationConfig(max_rejected_fraction=1.0))
    reasons = _reasons(rejected)
    assert any(
        "message 2 (assistant): tool_calls[1].function.arguments.city is bytes" in r
        for r in reasons
    ), reasons


MESSAGES = [
    {"role": "system", "content": "Be brief.", "id": "m0"},
    {"role": "user", "content": "Hi, I am Ada.", "name": "ada", "weight": 0, "id": "m1"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
        "reasoning_content": "Ada wants f.",
        "weight": 1,
    },
    {"role": "tool", "content": "ok", "tool_call_id": "call_7", "name": "f"},
    {"role": "assistant", "content": "Done, Ada.", "reasoning_content": "f said ok."},
]
ECHO = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + ('(' + m['name'] + ')' if m.get('name') else '') + '\\n' }}"
    "{%- if m.get('reasoning_content') %}{{ '<think>' + m['reasoning_content'] + '</think>' }}"
    "{% endif -%}"
    "{%- if m.get('tool_call_id') %}{{ '[' + m['tool_call_id'] + '] ' }}{% endif -%}"
    "{%- for c in m.get('tool_calls') or [] %}{{ 'CALL ' + c['function']['name'] }}{% endfor -%}"
    "{{ m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)


def _agent_records(tmp_path: Path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    return ingest(DataConfig(path=str(path)))


def test_per_message_keys_templates_read_are_kept_and_reach_the_template(tmp_path):
    records = _agent_records(tmp_path)
    kept = json.loads(records["messages"][0])
    assert kept[1]["name"] == "ada"
    assert kept[2]["reasoning_content"] == "Ada wants f."
    assert (kept[3]["tool_call_id"], kept[3]["name"]) == ("call_7", "f")
    assert kept[4]["reasoning_content"] == "f said ok."
    tokenizer = build_tiny_tokenizer()
    (file := tmp_path / "echo.jinja").write_text(ECHO)
    row = render_records(records, tokenizer, TemplateConfig(chat_template=str(file)))[0]
    text = "".join(s["text"] for s in row["segments"])
    assert "<|im_start|>user(ada)\nHi, I am Ada." in text
    assert "<think>Ada wants f.</think>CALL f" in text
    assert "<|im_start|>tool(f)\n[call_7] ok" in text
    assert "<think>f said ok.</think>Done, Ada." in text


def test_qwen3_renders_the_reasoning_content_of_a_record(tmp_path, fixtures_dir):
    path = tmp_path / "think.jsonl"
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
    ]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    records = ingest(DataConfig(path=str(path)))
    tokenizer = _gpt2(fixtures_dir, ["<|im_start|>", "<|im_end|>"], added=("<think>", "</think>"))
    tokenizer.chat_template = _fixture_template(fixtures_dir, "qwen3__tokenizer_config.json")
    row = Renderer(tokenizer, TemplateConfig()).row(json.loads(records["messages"][0]))
    supervised = "".join(s["text"] for s in row["segments"] if s["supervised"])
    assert supervised == "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"


def test_other_per_message_keys_are_counted_in_the_validation_report(tmp_path):
    records = _agent_records(tmp_path)
    kept = json.loads(records["messages"][0])
    assert not any("id" in message for message in kept)
    # `weight` is per-turn control, kept for rendering (tests/data/test_turn_rows.py).
    assert [message.get("weight") for message in kept] == [None, 0, 1, None, None]
    _valid, rejected, report = validate(records, ValidationConfig())
    assert rejected == []
    assert report["dropped_message_keys"] == {"id": 2}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("reasoning_content", 7, "reasoning_content is not a string (got number)")],
)
def test_a_kept_per_message_key_that_is_not_text_is_refused(tmp_path, key, value, expected):
    path = tmp_path / "bad.jsonl"
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", key: value},
    ]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    records = ingest(DataConfig(path=str(path)))
    _valid, rejected, _report = validate(records, ValidationConfig(max_rejected_fraction=1.0))
    assert _reasons(rejected) == [f"unsupported_value: message 2 (assistant): {expected}"]


def test_the_reasoning_a_template_renders_counts_towards_the_length_limit(tmp_path):
    path = tmp_path / "think.jsonl"
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "x" * 100},
    ]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    records = ingest(DataConfig(path=str(path)))
    cfg = ValidationConfig(max_chars=50, max_rejected_fraction=1.0)
    _valid, rejected, _report = validate(records, cfg)
    assert _reasons(rejected) == ["too_long: 105 characters, over validation.max_chars=50"]
