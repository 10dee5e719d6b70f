"""Values a record keeps but cannot train on as found, and the keys it left out.

Ingestion alters no value (`sft_pipeline.data.records`): a value JSON cannot hold (`bytes`
from a binary column) is stored tagged with its type, and the per-message keys templates read
(`MESSAGE_KEYS`) are kept as found. Validation refuses both when they are not text, naming where
the value is (`message 2 (assistant): content is bytes (b'Paris')`,
`message 2 (assistant): tool_calls[1].function.arguments.city is bytes`), and sums the keys
ingestion left out of the messages (`dropped_keys`) into the report's `dropped_message_keys`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from sft_pipeline.data.readers import json_type
from sft_pipeline.data.records import MESSAGE_KEYS, NOT_JSON


def type_name(value: Any) -> str:
    """The JSON type of a value, or the type a tagged value had (`bytes`)."""
    if isinstance(value, dict) and NOT_JSON in value:
        return str(value[NOT_JSON])
    return json_type(value)


def _tagged(value: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, tag) of every tagged value inside `value` (`where` as `a.b[1].c`)."""
    if isinstance(value, dict):
        if NOT_JSON in value:
            yield where, value
            return
        for key, item in value.items():
            yield from _tagged(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for k, item in enumerate(value, 1):
            yield from _tagged(item, f"{where}[{k}]")


def _refused(where: str, tag: dict[str, Any]) -> str:
    return f"{where} is {tag[NOT_JSON]} ({tag.get('repr')}), not text; decode it to a string"


def unsupported_values(view: dict[str, Any], _cfg: Any = None) -> list[str]:
    """Every tagged value of a record, and every kept per-message key that is not a string."""
    problems = []
    turns = view["turns"]
    for i, turn in enumerate(turns if isinstance(turns, list) else [], 1):
        if not isinstance(turn, dict):
            continue
        label = f"message {i} ({turn.get('role')})"
        problems.extend(f"{label}: {_refused(where, tag)}" for where, tag in _tagged(turn, ""))
        problems.extend(
            f"{label}: {key} is not a string (got {type_name(turn[key])})"
            for key in MESSAGE_KEYS
            if turn.get(key) is not None
            and not isinstance(turn[key], str)
            and type_name(turn[key]) in ("object", "list", "boolean", "number")
        )
    problems.extend(_refused(where, tag) for where, tag in _tagged(view["tools"], "tools"))
    return problems


def count_dropped(column: Iterable[str], counts: Counter[str]) -> None:
    """Add the `dropped_keys` of a chunk of records (JSON `{key: messages}` or "") to `counts`."""
    for value in column:
        if value:
            counts.update(json.loads(value))
