"""Whether a chat template renders a record's tools, decided by the structure of its renderings.

A substring test cannot tell: a user who writes "can get_weather help?" puts the function's name
in the text whether or not the template writes the definitions, and a short result ("21",
"Paris") is found in the assistant's reply whether or not the template writes the result. So
each record is rendered three ways, and the renderings are compared:

    with tools=:      <tools>{"name": "get_weather", "parameters": {"city": ...}}</tools>
                      user: can get_weather help? ... tool: 21 ... assistant: It is 21.
    without tools=:   user: can get_weather help? ... tool: 21 ... assistant: It is 21.
        -> every function name, and every parameter name of its schema, occurs more often
           in the first: the definitions wrote them, not the conversation
    results marked:   ... tool: <TOOL-RESULT-1-...> ... assistant: It is 21.
        -> every marker comes out, and the rendering with tools is exactly the marked one
           with each marker replaced by its result (as given, stripped, or JSON-escaped as
           `tojson` writes a string)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from jinja2 import TemplateError

# Renders messages (with tools= or without, when None) without the generation prompt.
Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]


def problem(
    render: Render, messages: list[dict[str, Any]], tools: list[Any] | None, full: str
) -> str | None:
    """What the template drops of a record's tools (`full`: its rendering with them), or None."""
    return _definitions_problem(render, messages, tools, full) or _results_problem(
        render, messages, tools, full
    )


def _terms(tool: Any) -> tuple[str | None, list[str]]:
    """(function name, parameter names) of one tool definition in the OpenAI shape."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None, []
    parameters = function.get("parameters")
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    return function["name"], [k for k in properties or {} if isinstance(k, str) and k]


def _definitions_problem(
    render: Render, messages: list[dict[str, Any]], tools: list[Any] | None, full: str
) -> str | None:
    if not tools:
        return None
    try:
        without = render(messages, None)
    except TemplateError:
        without = ""  # a template that needs its tools: everything it writes is theirs
    for tool in tools:
        name, parameters = _terms(tool)
        if not name:
            continue
        if full.count(name) <= without.count(name):
            return f"the tool definitions (`tools`) are not rendered ({name!r} is missing)"
        if absent := [p for p in parameters if full.count(p) <= without.count(p)]:
            return (
                "the tool definitions (`tools`) are rendered without the parameters of "
                f"{name!r} ({absent[0]!r} is missing)"
            )
    return None


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return None


def _forms(text: str) -> list[str]:
    """How a template may write a result: as given, stripped, JSON-escaped (inside quotes)."""
    forms = [text, text.strip(), json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]]
    return list(dict.fromkeys(forms))


def _results_problem(
    render: Render, messages: list[dict[str, Any]], tools: list[Any] | None, full: str
) -> str | None:
    results = [
        i for i, m in enumerate(messages) if m["role"] == "tool" and _text(m["content"]) is not None
    ]
    if not results:
        return None
    token = hashlib.sha256(full.encode("utf-8")).hexdigest()[:12]
    while token in full:
        token += "x"
    markers = {f"<TOOL-RESULT-{i + 1}-{token}>": i for i in results}
    marked = [dict(m) for m in messages]
    for marker, i in markers.items():
        content = messages[i]["content"]
        marked[i]["content"] = (
            [{"type": "text", "text": marker}] if isinstance(content, list) else marker
        )
    try:
        rendered = render(marked, tools)
    except TemplateError as exc:
        return f"the tool results cannot be rendered with a marker in their place ({exc})"
    pieces = re.split("(" + "|".join(map(re.escape, markers)) + ")", rendered)
    if absent := [i for marker, i in markers.items() if marker not in pieces[1::2]]:
        return f"the tool results are not rendered (message {absent[0] + 1})"
    at = 0
    for k in range(0, len(pieces), 2):
        if not full.startswith(pieces[k], at):
            return "the tool results change how the rest of the conversation is rendered"
        at += len(pieces[k])
        if k + 1 == len(pieces):
            break
        i = markers[pieces[k + 1]]
        forms = _forms(_text(messages[i]["content"]) or "")
        form = next((f for f in forms if full.startswith(f + pieces[k + 2], at)), None)
        if form is None:
            return f"the tool results are not rendered as given (message {i + 1})"
        at += len(form)
    return None if at == len(full) else "the tool results are not rendered as given"


def is_tool_turn(message: dict[str, Any]) -> bool:
    return message["role"] == "tool" or bool(message.get("tool_calls"))
