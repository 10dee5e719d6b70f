"""Agent data in, canonical records out: OpenAI `tool_calls`/`tool` messages and ShareGPT
`function_call`/`observation` turns map to the same record with its tool definitions, and bad
agent records are quarantined with their reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft_pipeline.common.config import DataConfig, ValidationConfig
from sft_pipeline.data.records import content_id
from tests.data.rows import ingest, validate

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CANONICAL = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]


def openai_row(arguments: Any = '{"city": "Paris"}', tools: Any = None, **call: Any) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": call.get("name", "get_weather"),
                            "arguments": arguments,
                        },
                        **({"id": call["id"]} if "id" in call else {}),
                    }
                ],
            },
            {
                "role": "tool",
                "content": '{"temp": 21}',
                **({"tool_call_id": call["result_id"]} if "result_id" in call else {}),
            },
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
        "tools": [{"type": "function", "function": WEATHER}] if tools is None else tools,
    }


def sharegpt_row(call: str = '{"name": "get_weather", "arguments": {"city": "Paris"}}') -> dict:
    return {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 degrees in Paris."},
        ],
        "tools": json.dumps([WEATHER]),
    }


def ingest_rows(tmp_path: Path, rows: list[dict], name: str = "d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ingest(DataConfig(path=str(path)))


def test_openai_and_sharegpt_agent_data_map_to_the_same_record(tmp_path: Path) -> None:
    as_object = openai_row(arguments={"city": "Paris"})
    as_string = openai_row(tools=json.dumps([{"type": "function", "function": WEATHER}]))
    openai = ingest_rows(tmp_path, [as_object, as_string], "openai.jsonl")
    sharegpt = ingest_rows(tmp_path, [sharegpt_row()], "sharegpt.jsonl")
    for records in (openai, sharegpt):
        for messages, tools in zip(records["messages"], records["tools"], strict=True):
            assert json.loads(messages) == CANONICAL
            assert json.loads(tools) == [{"type": "function", "function": WEATHER}]
    # Same content, same id: the format (and how arguments were written) does not matter.
    assert len({*openai["record_id"], *sharegpt["record_id"]}) == 1


def test_tools_take_part_in_the_content_id_only_when_given(tmp_path: Path) -> None:
    plain = {"messages": [CANONICAL[0], {"role": "assistant", "content": "Sunny."}]}
    with_tools = {**plain, "tools": [WEATHER]}
    empty_tools = {**plain, "tools": "[]"}
    records = ingest_rows(tmp_path, [plain, with_tools, empty_tools])
    assert list(records["tools"]) == [
        "",
        json.dumps([{"type": "function", "function": WEATHER}]),
        "",
    ]
    # A record without tools keeps the id it had before tools were part of a record.
    legacy = content_id(plain["messages"], "")
    assert list(records["record_id"]) == [legacy, records["record_id"][1], legacy]
    assert records["record_id"][1] != legacy


def test_tool_result_ids_and_names_are_kept(tmp_path: Path) -> None:
    records = ingest_rows(tmp_path, [openai_row(id="call_1", result_id="call_1")])
    messages = json.loads(records["messages"][0])
    assert messages[1]["tool_calls"][0]["id"] == "call_1"
    assert messages[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}


def run_validation(tmp_path: Path, rows: list[dict]):
    records = ingest_rows(tmp_path, rows)
    valid, rejected, report = validate(records, ValidationConfig())
    assert report["ingested"] == len(records) == len(valid) + len(rejected)
    return valid, rejected, report


def test_valid_agent_records_pass(tmp_path: Path) -> None:
    parallel = openai_row(id="a", result_id="a")
    parallel["messages"][1]["tool_calls"].append(
        {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}, "id": "b"}
    )
    parallel["messages"].insert(3, {"role": "tool", "content": "{}", "tool_call_id": "b"})
    untooled = openai_row(tools=[])  # calls without declared tools: nothing to check them against
    valid, rejected, _report = run_validation(tmp_path, [openai_row(), parallel, untooled])
    assert rejected == []
    assert len(valid) == 3


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            openai_row(arguments='{"city": "Paris"'),
            "malformed_tool_call: message 2 (assistant): tool call 1 arguments do not parse as "
            "JSON (Expecting ',' delimiter",
        ),
        (
            openai_row(arguments="[1, 2]"),
            "malformed_tool_call: message 2 (assistant): tool call 1 arguments are not a JSON "
            "object (got list)",
        ),
        (
            sharegpt_row(call='{"name": "get_weather", "arguments": {"city": "Paris"}'),
            "malformed_tool_call: message 2 (assistant): the tool call is not JSON",
        ),
        (
            openai_row(name=None),
            "malformed_tool_call: message 2 (assistant): tool call 1 has no function name",
        ),
        (
            openai_row(name="get_wether"),
            "undeclared_function: message 2 (assistant): tool call 1 calls 'get_wether', which "
            "tools does not declare (declared: get_weather)",
        ),
        (
            openai_row(id="call_1", result_id="call_9"),
            "orphan_tool_result: message 3 (tool) answers tool_call_id 'call_9', which no call "
            "of message 2 has (ids: call_1)",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "Weather in Paris?"},
                    {"from": "observation", "value": '{"temp": 21}'},
                    {"from": "gpt", "value": "It is 21 degrees."},
                ]
            },
            "orphan_tool_result: message 2 (tool) answers no tool call",
        ),
        (
            {**openai_row(), "messages": [*openai_row()["messages"][:3], CANONICAL[2]]},
            "last_not_assistant: the last message (4, tool) is not the assistant's",
        ),
        (
            {**openai_row(), "messages": [*openai_row()["messages"][:2], CANONICAL[3]]},
            "not_alternating: message 3 (assistant) where the result of the tool call before it "
            "was expected",
        ),
        (
            {**openai_row(), "tools": '[{"name": "get_weather"'},
            "bad_tools: tools is not valid JSON",
        ),
    ],
)
def test_bad_agent_records_are_quarantined_with_their_reason(
    tmp_path: Path, row: dict, expected: str
) -> None:
    _valid, rejected, _report = run_validation(tmp_path, [row])
    assert len(rejected) == 1
    reasons = rejected[0]["reasons"]
    assert any(r.startswith(expected) for r in reasons), reasons
    # The original record is kept as found, for the report.
    assert rejected[0]["record"] == row
