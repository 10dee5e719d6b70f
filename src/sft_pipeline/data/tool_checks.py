"""What makes a record's tools invalid: definitions, calls, and the results that answer them.

Checks take a record's view (`sft_pipeline.data.conversation_checks.View`) and return one reason
per problem; `sft_pipeline.data.validation` names each by its reason code.
"""

from __future__ import annotations

import json
from typing import Any

from sft_pipeline.common.config import ValidationConfig
from sft_pipeline.data.conversation_checks import (
    View,
    calls_tools,
    dict_turns,
    label,
    type_name,
)


def _declared(tools: Any) -> list[str] | None:
    """Names of the functions `tools` declares; None when the record has no usable tools."""
    if not isinstance(tools, list):
        return None
    names = [function_name(tool) for tool in tools]
    return [n for n in names if n is not None] or None


def function_name(entry: Any) -> str | None:
    function = entry.get("function") if isinstance(entry, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def bad_tools(view: View, _cfg: ValidationConfig) -> list[str]:
    tools = view["tools"]
    if tools is None:
        return []
    if isinstance(tools, str):  # stored as found because it did not parse
        return [f"tools is not valid JSON ({_json_error(tools)}); expected a list of functions"]
    if not isinstance(tools, list):
        return [f"tools is not a list of function definitions (got {type_name(tools)})"]
    return [
        f"tool {k} is not a function definition with a name "
        f'({{"type": "function", "function": {{"name", "parameters"}}}} or '
        f'{{"name", "parameters"}}; got {json.dumps(tool, default=str)[:80]})'
        for k, tool in enumerate(tools, 1)
        if function_name(tool) is None
    ]


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return str(exc)
    return "a JSON string holding JSON: encoded twice"


def _call_problems(call: Any) -> list[str]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return [f"is not an object with a function name and arguments (got {type_name(call)})"]
    function = call["function"]
    problems = []
    if function_name(call) is None:
        problems.append(f"has no function name (got {type_name(function.get('name'))})")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        problems.append(f"arguments do not parse as JSON ({_json_error(arguments)})")
    elif not isinstance(arguments, dict):
        problems.append(f"arguments are not a JSON object (got {type_name(arguments)})")
    return problems


def malformed_tool_call(view: View, _cfg: ValidationConfig) -> list[str]:
    problems = []
    for i, turn in dict_turns(view):
        if not calls_tools(turn):
            continue
        calls = turn["tool_calls"]
        if isinstance(calls, str):
            problems.append(f"{label(i, turn)}: the tool call is not JSON ({_json_error(calls)})")
        elif not isinstance(calls, list) or not calls:
            problems.append(
                f"{label(i, turn)}: tool_calls is not a non-empty list (got {type_name(calls)})"
            )
        else:
            problems.extend(
                f"{label(i, turn)}: tool call {k} {problem}"
                for k, call in enumerate(calls, 1)
                for problem in _call_problems(call)
            )
    return problems


def undeclared_function(view: View, _cfg: ValidationConfig) -> list[str]:
    declared = _declared(view["tools"])
    if declared is None:  # no tools given: nothing to check calls against
        return []
    return [
        f"{label(i, turn)}: tool call {k} calls {name!r}, which tools does not declare "
        f"(declared: {', '.join(declared)})"
        for i, turn in dict_turns(view)
        if calls_tools(turn) and isinstance(turn["tool_calls"], list)
        for k, call in enumerate(turn["tool_calls"], 1)
        if (name := function_name(call)) is not None and name not in declared
    ]


def orphan_tool_result(view: View, _cfg: ValidationConfig) -> list[str]:
    """Every tool result answers a call of the assistant turn right before its block of
    results: one result per call, with a matching `tool_call_id` / `name` where given."""
    problems = []
    calls: list[Any] | None = None  # the calls the current block of results answers
    caller, answered = 0, 0
    for i, turn in dict_turns(view):
        role = turn.get("role")
        if role != "tool":
            calls, caller, answered = (
                (turn["tool_calls"], i, 0) if calls_tools(turn) else (None, 0, 0)
            )
            continue
        answered += 1
        if calls is not None and not isinstance(calls, list):
            continue  # the calls themselves are malformed: `malformed_tool_call` says so
        if calls is None:
            problems.append(
                f"message {i} (tool) answers no tool call: no assistant turn calling a tool "
                "comes right before it"
            )
        elif answered > len(calls):
            problems.append(
                f"message {i} (tool) is result {answered} of message {caller}'s "
                f"{len(calls)} tool call(s)"
            )
        else:
            problems.extend(_mismatch(i, turn, calls, caller))
    return problems


def _mismatch(i: int, turn: dict[str, Any], calls: list[Any], caller: int) -> list[str]:
    ids = [c.get("id") for c in calls if isinstance(c, dict) and c.get("id") is not None]
    names = [n for c in calls if (n := function_name(c)) is not None]
    problems = []
    call_id, name = turn.get("tool_call_id"), turn.get("name")
    if call_id is not None and ids and call_id not in ids:
        problems.append(
            f"message {i} (tool) answers tool_call_id {call_id!r}, which no call of message "
            f"{caller} has (ids: {', '.join(map(str, ids))})"
        )
    if name is not None and names and name not in names:
        problems.append(
            f"message {i} (tool) is the result of {name!r}, which message {caller} does not "
            f"call (calls: {', '.join(names)})"
        )
    return problems
