"""Canonical records: every input format maps to a list of `{role, content}` messages or plain text.

The mapping keeps content and roles exactly as found (a number where a string belongs, an unknown
role): deciding what is acceptable is validation's job, so a bad record is reported with its
reasons instead of being dropped or crashing ingestion.

Agent data (tool definitions, tool calls, tool results) maps to the OpenAI shape that chat
templates take (`apply_chat_template(messages, tools=...)`), whatever the input format:

    {"role": "assistant", "content": "",                   OpenAI `tool_calls`, ShareGPT
     "tool_calls": [{"type": "function",                   `function_call` turns (value:
                     "function": {"name": "get_weather",     {"name", "arguments"} or a list)
                                  "arguments": {"city": "Paris"}},
                     "id": "call_1"}]}                     (`id` only where the data has one)
    {"role": "tool", "content": "{\"temp\": 21}",          OpenAI `tool` (legacy `function`)
     "tool_call_id": "call_1", "name": "get_weather"}      messages, ShareGPT `observation`

Arguments given as a JSON string are parsed into the object templates expect; a string that does
not parse is kept as found, for validation to name. Tool definitions are stored in their own
`tools` column as a JSON string of `[{"type": "function", "function": {name, description,
parameters}}]` (bare `{name, description, parameters}` entries, as glaive/LLaMA-Factory write
them, are wrapped), or "" for a record without tools. A message without tool fields is exactly
`{role, content}`, and a record without tools has the same content id as before tools existed.

Values are kept or refused, never altered: the per-message keys chat templates read
(`MESSAGE_KEYS`: a tool result's `tool_call_id`, a speaker's `name`, an assistant's
`reasoning_content`) are kept on every message; any other key a message carries (a `weight`, an
export's `id`) is left out of the message and counted in the `dropped_keys` column, which the
validation report sums. A value JSON cannot hold (`bytes` from a binary column) is stored as a
tagged object `{"$not_json": "bytes", "repr": "b'Paris'"}`, never as the text of its repr, so
validation refuses it naming its type.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from sft_pipeline.data.images import attach_images, has_images
from sft_pipeline.data.schemas import (
    SCHEMAS,
    detect_schema,
    expected_columns,
    optional_fields,
    resolve_columns,
    schema_keys,
)

# Importers of the record mapping also find the schema functions here.
__all__ = [
    "MESSAGE_KEYS",
    "NOT_JSON",
    "RECORD_COLUMNS",
    "SCHEMAS",
    "canonical_tools",
    "content_id",
    "detect_schema",
    "dropped_keys",
    "dumps_messages",
    "dumps_raw",
    "expected_columns",
    "loads_tools",
    "make_frame",
    "normalize_turns",
    "resolve_columns",
    "row_tools",
    "schema_keys",
    "to_canonical",
    "tool_calls",
]

RECORD_COLUMNS = [
    "record_id",
    "source_file",
    "source_row",
    "format",
    "messages",
    "tools",
    "text",
    "raw",
    "dropped_keys",
]
_INT_COLUMNS = {"source_row"}
# Columns a row may leave out (records made before the column existed).
_DEFAULTS = {"tools": "", "dropped_keys": ""}
# Per-message keys that chat templates read, kept as found on any message (module doc).
MESSAGE_KEYS = ("tool_call_id", "name", "reasoning_content")
# The keys each message shape consumes itself.
_OPENAI_KEYS = frozenset({"role", "content", "tool_calls", "function_call", *MESSAGE_KEYS})
_SHAREGPT_KEYS = frozenset({"from", "value", *MESSAGE_KEYS})
NOT_JSON = "$not_json"

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    # LLaMA-Factory's agent turns (glaive): the assistant's call and the tool's answer.
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def content_id(messages: Any, text: str, tools: str = "") -> str:
    """First 16 hex chars of sha256 over the canonical content (same content -> same id).

    `tools` (the `tools` column) takes part only when the record has tools, so records without
    them keep the ids they had before tools were part of a record."""
    content: dict[str, Any] = {"messages": messages, "text": text}
    if tools:
        content["tools"] = json.loads(tools)
    payload = json.dumps(content, sort_keys=True, ensure_ascii=False, default=not_json)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def not_json(value: Any) -> dict[str, str]:
    """How a value JSON cannot hold is stored: tagged with its type, for validation to refuse
    (its repr as text would pass as content: `b'Paris'`)."""
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    return {NOT_JSON: type(value).__name__, "repr": repr(value)[:80]}


def dumps_messages(messages: Any) -> str:
    """Serialize messages for the `messages` column (key order kept: role, content)."""
    return json.dumps(messages, ensure_ascii=False, default=not_json)


def dumps_raw(row: Mapping[str, Any]) -> str:
    """The original record as JSON, for the rejects report (non-JSON values become strings)."""
    return json.dumps(dict(row), ensure_ascii=False, default=str)


def _maybe_json_list(value: Any) -> Any:
    # CSV and some Parquet exports store conversations as JSON strings; decode when it is a list.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def normalize_turns(turns: Any) -> Any:
    """Map each turn to {role, content} (+ tool fields, module doc); `from`/`value` turns use
    ShareGPT role names.

    Anything that is not a list of objects is returned as found, for validation to reject.
    """
    turns = _maybe_json_list(turns)
    if not isinstance(turns, list):
        return turns
    normalized: list[Any] = []
    for turn in turns:
        if not isinstance(turn, dict):
            normalized.append(turn)
        elif "role" in turn or "content" in turn:
            normalized.append(_openai_turn(turn))
        else:
            normalized.append(_sharegpt_turn(turn))
    return normalized


def _openai_turn(turn: dict[str, Any]) -> dict[str, Any]:
    role, content = turn.get("role"), turn.get("content")
    if role == "function":  # OpenAI's legacy name for a tool result
        role = "tool"
    message: dict[str, Any] = {"role": role, "content": content}
    calls = turn.get("tool_calls")
    if calls is None and turn.get("function_call") is not None:  # legacy single call
        calls = [turn["function_call"]]
    if role == "assistant" and calls is not None and calls != []:
        # A call without text has content null in OpenAI's format; templates want a string.
        message["content"] = "" if content is None else content
        message["tool_calls"] = tool_calls(calls)
    return _keep_keys(turn, message)


def _keep_keys(turn: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    for key in MESSAGE_KEYS:
        if turn.get(key) is not None:
            message[key] = turn[key]
    return message


def _sharegpt_turn(turn: dict[str, Any]) -> dict[str, Any]:
    source, value = turn.get("from"), turn.get("value")
    if source == "function_call":
        # The value is the call as JSON ({"name", "arguments"}, or a list of them); one that does
        # not parse is kept as a string for validation to name.
        return {"role": "assistant", "content": "", "tool_calls": tool_calls(_maybe_json(value))}
    # Unknown ShareGPT roles are kept so validation names them.
    role = SHAREGPT_ROLES.get(source, source) if isinstance(source, str) else source
    return _keep_keys(turn, {"role": role, "content": value})


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def tool_calls(calls: Any) -> Any:
    """Calls in the OpenAI shape `[{"type": "function", "function": {name, arguments}}]`.

    Takes OpenAI calls, bare `{"name", "arguments"|"parameters"}` objects (ShareGPT, Llama 3) or
    one such object; arguments given as a JSON string are parsed. Anything else is returned as
    found, for validation to reject with its reason."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        return calls
    return [_tool_call(call) for call in calls]


def _tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    # Llama 3 writes `parameters` where OpenAI writes `arguments`.
    arguments = function["arguments"] if "arguments" in function else function.get("parameters")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": function.get("name"), "arguments": _maybe_json(arguments)},
    }
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def canonical_tools(value: Any) -> str:
    """The `tools` column: JSON of the tool definitions in the OpenAI shape, "" for none.

    A JSON string that does not parse is stored as a JSON string literal (validation names it);
    entries that are not function definitions are kept as found."""
    if hasattr(value, "tolist"):  # a list column read from Parquet or Arrow
        value = value.tolist()
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list) and not value:
        return ""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        value = [_tool_definition(tool) for tool in value]
    return json.dumps(value, ensure_ascii=False, default=not_json)


def _tool_definition(tool: Any) -> Any:
    if isinstance(tool, dict) and "function" not in tool and "name" in tool:
        return {"type": "function", "function": tool}
    return tool


def loads_tools(value: str) -> Any:
    """The tool definitions of a `tools` column value, or None for a record without tools."""
    return json.loads(value) if value else None


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _alpaca_prompt(instruction: Any, extra: Any) -> Any:
    if _is_blank(extra):
        return instruction
    if isinstance(instruction, str) and isinstance(extra, str):
        return f"{instruction}\n\n{extra}"
    # A non-string part cannot be joined without hiding it; keep both so validation reports it.
    return {"instruction": instruction, "input": extra}


def to_canonical(
    row: Mapping[str, Any],
    schema: str,
    columns: Mapping[str, str] | None = None,
    image_root: Path | None = None,
    *,
    digest_images: bool = True,
) -> tuple[str, Any, str]:
    """Map one input row to (format, messages, text); `columns` maps our fields to row keys.

    Images (an `images` column, `<image>` placeholders, image parts) become canonical image
    parts (`sft_pipeline.data.images`); relative image paths are relative to `image_root`.
    `digest_images=False` names image files without reading them (no `sha256`)."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    # A row lacking a field (that other rows have) reads as None, for validation to report.
    resolved, _missing = resolve_columns(schema, row.keys(), columns)
    fmt, turns, text = _to_canonical(row, schema, resolved)
    images_column = resolved.get("images")
    images = row.get(images_column) if images_column else None
    if schema != "text" and has_images(images, turns, placeholders=bool(images_column)):
        turns = attach_images(turns, images, image_root, digest_images)
    return fmt, turns, text


def _to_canonical(
    row: Mapping[str, Any], schema: str, resolved: Mapping[str, str]
) -> tuple[str, Any, str]:
    def value(name: str) -> Any:
        return row.get(resolved[name]) if name in resolved else None

    system = value("system")
    prefix = [] if _is_blank(system) else [{"role": "system", "content": system}]
    if schema == "text":
        text = value("text")
        return schema, [], text if isinstance(text, str) else ""
    if schema == "prompt_response":
        turns = [
            {"role": "user", "content": value("prompt")},
            {"role": "assistant", "content": value("response")},
        ]
        return schema, prefix + turns, ""
    if schema == "alpaca":
        turns = [
            {"role": "user", "content": _alpaca_prompt(value("instruction"), value("input"))},
            {"role": "assistant", "content": value("output")},
        ]
        return schema, prefix + turns, ""
    field = "messages" if schema == "messages" else "conversations"
    turns = normalize_turns(value(field))
    if prefix and isinstance(turns, list):
        turns = prefix + turns
    return schema, turns, ""


def row_tools(row: Mapping[str, Any], schema: str, columns: Mapping[str, str] | None = None) -> str:
    """The `tools` column value of one input row ("" when its format or the row has none)."""
    if "tools" not in optional_fields(schema):
        return ""
    resolved, _missing = resolve_columns(schema, row.keys(), columns)
    return canonical_tools(row.get(resolved["tools"])) if "tools" in resolved else ""


def dropped_keys(
    row: Mapping[str, Any], schema: str, columns: Mapping[str, str] | None = None
) -> str:
    """The `dropped_keys` column of one input row: JSON `{key: messages}` of the per-message
    keys its messages carry that no template reads (left out of the messages), "" for none."""
    if schema not in ("messages", "sharegpt"):
        return ""
    resolved, _missing = resolve_columns(schema, row.keys(), columns)
    field = "messages" if schema == "messages" else "conversations"
    turns = _maybe_json_list(row.get(resolved[field])) if field in resolved else None
    counts: dict[str, int] = {}
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        known = _OPENAI_KEYS if "role" in turn or "content" in turn else _SHAREGPT_KEYS
        for key, value in turn.items():
            if key not in known and value is not None:
                counts[str(key)] = counts.get(str(key), 0) + 1
    return json.dumps(dict(sorted(counts.items()))) if counts else ""


def make_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Canonical records DataFrame with fixed column order and plain str/int64 dtypes."""
    return pd.DataFrame(
        {
            name: pd.Series(
                [row[name] if name in row else _DEFAULTS[name] for row in rows],
                dtype="int64" if name in _INT_COLUMNS else "str",
            )
            for name in RECORD_COLUMNS
        }
    )
