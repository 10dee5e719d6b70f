"""Messages and tools in the canonical shape, whatever shape the input gave them.

The turn and tool mapping keeps content and roles exactly as found (a number where a string
belongs, an unknown role): deciding what is acceptable is validation's job, so a bad record is
reported with its reasons instead of being dropped or crashing ingestion.

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
them, are wrapped), or "" for a record without tools.

Values are kept or refused, never altered: the per-message keys chat templates read
(`MESSAGE_KEYS`) are kept on every message; any other key a message carries is left out and
counted (`dropped_message_keys`). An assistant's reasoning is kept apart from its answer as
`reasoning_content`, whether the input wrote it so, as gpt-oss `thinking`, or inline at the start
of the content between `data.reasoning_tags` (`split_inline_reasoning`); the per-turn control
keys `train`/`weight` are kept for rendering (`sft_pipeline.data.turn_rows`). A value JSON
cannot hold (`bytes` from a binary column) is stored as a tagged object
`{"$not_json": "bytes", "repr": "b'Paris'"}` (`not_json`).
"""

from __future__ import annotations

import json
from typing import Any

MESSAGE_KEYS = ("tool_call_id", "name", "reasoning_content")
# Per-turn control (`sft_pipeline.data.reasoning`): kept for rendering to read, never rendered.
CONTROL_KEYS = ("train", "weight")
REASONING_KEY = "reasoning_content"
# Reasoning rendering writes into the content itself (`sft_pipeline.data.turn_rows`): set
# before control-token text in records is marked, joined to the content at rendering, so the
# tags are the template's own tokens and the reasoning stays data.
INLINE_KEY = "_inline_reasoning"
INLINE_TAGS = ("<think>", "</think>")
# gpt-oss writes an assistant's reasoning as `thinking`; the canonical key is `reasoning_content`.
_REASONING_ALIASES = ("thinking",)
# The keys each message shape consumes itself.
_KEPT = (*MESSAGE_KEYS, *CONTROL_KEYS, *_REASONING_ALIASES)
_OPENAI_KEYS = frozenset({"role", "content", "tool_calls", "function_call", *_KEPT})
_SHAREGPT_KEYS = frozenset({"from", "value", *_KEPT})
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


def not_json(value: Any) -> dict[str, str]:
    """How a value JSON cannot hold is stored: tagged with its type, for validation to refuse
    (its repr as text would pass as content: `b'Paris'`)."""
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    return {NOT_JSON: type(value).__name__, "repr": repr(value)[:80]}


def maybe_json_list(value: Any) -> Any:
    # CSV and some Parquet exports store conversations as JSON strings; decode when it is a list.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def is_messages(value: Any) -> bool:
    """Whether `value` is a list of `{role, ...}` messages (TRL's conversational columns).

    An assistant message that only calls tools may come without `content` (TRL's examples)."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def normalize_turns(turns: Any) -> Any:
    """Map each turn to {role, content} (+ tool fields, module doc); `from`/`value` turns use
    ShareGPT role names.

    Anything that is not a list of objects is returned as found, for validation to reject.
    """
    turns = maybe_json_list(turns)
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
    for key in (*MESSAGE_KEYS, *CONTROL_KEYS):
        if turn.get(key) is not None:
            message[key] = turn[key]
    for alias in _REASONING_ALIASES:
        if turn.get(alias) is not None and "reasoning_content" not in message:
            message["reasoning_content"] = turn[alias]
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


def dropped_message_keys(turns: Any) -> dict[str, int]:
    """{key: messages} of the per-message keys no template reads, over the turns as found."""
    counts: dict[str, int] = {}
    turns = maybe_json_list(turns)
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        known = _OPENAI_KEYS if "role" in turn or "content" in turn else _SHAREGPT_KEYS
        for key, value in turn.items():
            if key not in known and value is not None:
                counts[str(key)] = counts.get(str(key), 0) + 1
    return dict(sorted(counts.items()))


def split_inline_reasoning(messages: Any, tags: tuple[str, str]) -> Any:
    """Messages with the reasoning written inline at the start of an assistant's content moved
    to its `reasoning_content` (the answer keeps what follows the closing tag, leading newlines
    dropped as templates drop them). A message that already has `reasoning_content`, or whose
    tag is not closed, is kept as found (validation names the latter)."""
    if not isinstance(messages, list):
        return messages
    opening, closing = tags
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if (
            isinstance(content, str)
            and message.get("role") == "assistant"
            and message.get("reasoning_content") is None
            and content.lstrip().startswith(opening)
            and closing in content
        ):
            inner, _, answer = content.lstrip()[len(opening) :].partition(closing)
            message = {
                **message,
                "content": answer.lstrip("\n"),
                "reasoning_content": inner.strip("\n"),
            }
        out.append(message)
    return out


def reasoning_of(message: dict[str, Any]) -> str:
    value = message.get(REASONING_KEY)
    return value if isinstance(value, str) else ""


def is_trained(message: dict[str, Any]) -> bool:
    """Whether an assistant message is supervised (`train: false`, `weight: 0`: context)."""
    return message.get("train") is not False and message.get("weight") != 0


def with_inline_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with each `INLINE_KEY` reasoning written at the start of the content, between
    `INLINE_TAGS`, as the model generates it (`<think>\n...\n</think>\n\n` + answer)."""
    if not any(INLINE_KEY in m for m in messages):
        return messages
    opening, closing = INLINE_TAGS
    out = []
    for message in messages:
        if INLINE_KEY in message:
            message = dict(message)
            reasoning = message.pop(INLINE_KEY).strip("\n")
            answer = message["content"].lstrip("\n")
            message["content"] = f"{opening}\n{reasoning}\n{closing}\n\n{answer}"
        out.append(message)
    return out
