"""Canonical records: every input format maps to a list of `{role, content}` messages or plain text.

The mapping keeps content and roles exactly as found (a number where a string belongs, a ShareGPT
`function_call` turn): deciding what is acceptable is validation's job, so a bad record is reported
with its reasons instead of being dropped or crashing ingestion.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

RECORD_COLUMNS = ["record_id", "source_file", "source_row", "format", "messages", "text", "raw"]
_INT_COLUMNS = {"source_row"}

SCHEMAS = ("prompt_response", "alpaca", "messages", "sharegpt", "text")
# Auto-detection tries schemas in this order; the first is also the tie-breaker.
_DETECTION_ORDER = ("messages", "sharegpt", "prompt_response", "alpaca", "text")

# Per schema: our field -> (keys of data.columns that may rename it, default dataset column names).
# Alpaca's `output` also answers to `response`, because GPTeacher and others ship
# instruction/input/response, and `data.columns: {response: response}` should just work.
_REQUIRED: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "prompt_response": {
        "prompt": (("prompt",), ("prompt",)),
        "response": (("response", "completion"), ("response", "completion")),
    },
    "alpaca": {
        "instruction": (("instruction",), ("instruction",)),
        "output": (("output", "response"), ("output", "response")),
    },
    "messages": {"messages": (("messages",), ("messages",))},
    "sharegpt": {"conversations": (("conversations",), ("conversations",))},
    "text": {"text": (("text",), ("text",))},
}
_OPTIONAL: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "alpaca": {"input": (("input",), ("input",))},
}
_SYSTEM_FIELD = (("system",), ("system",))

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def content_id(messages: Any, text: str) -> str:
    """First 16 hex chars of sha256 over the canonical content (same content -> same id)."""
    payload = json.dumps(
        {"messages": messages, "text": text}, sort_keys=True, ensure_ascii=False, default=str
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def dumps_messages(messages: Any) -> str:
    """Serialize messages for the `messages` column (key order kept: role, content)."""
    return json.dumps(messages, ensure_ascii=False, default=str)


def loads_messages(value: str) -> Any:
    """Inverse of `dumps_messages`; a list of dicts for every record that passed validation."""
    return json.loads(value)


def dumps_raw(row: Mapping[str, Any]) -> str:
    """The original record as JSON, for the rejects report (non-JSON values become strings)."""
    return json.dumps(dict(row), ensure_ascii=False, default=str)


def _lookup(
    field: tuple[tuple[str, ...], tuple[str, ...]],
    available: Iterable[str],
    columns_map: Mapping[str, str],
) -> str | None:
    """The dataset column holding a field, or None. An explicit mapping is never second-guessed."""
    keys, defaults = field
    present = set(available)
    for key in keys:
        if key in columns_map:
            return columns_map[key] if columns_map[key] in present else None
    return next((name for name in defaults if name in present), None)


def resolve_columns(
    schema: str, available: Iterable[str], columns_map: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """(our field -> dataset column for every field found, required fields not found)."""
    columns_map = columns_map or {}
    available = list(available)
    resolved: dict[str, str] = {}
    missing: list[str] = []
    for name, field in _REQUIRED[schema].items():
        column = _lookup(field, available, columns_map)
        if column is None:
            missing.append(name)
        else:
            resolved[name] = column
    for name, field in {**_OPTIONAL.get(schema, {}), "system": _SYSTEM_FIELD}.items():
        column = _lookup(field, available, columns_map)
        if column is not None:
            resolved[name] = column
    return resolved, missing


def expected_columns(schema: str) -> str:
    """Human description of a schema's columns: `instruction, output|response; optional: ...`."""
    parts = ["|".join(defaults) for _keys, defaults in _REQUIRED[schema].values()]
    optional = [defaults[0] for _keys, defaults in _OPTIONAL.get(schema, {}).values()]
    optional.append("system")
    return ", ".join(parts) + "; optional: " + ", ".join(optional)


def schema_keys(schema: str) -> set[str]:
    """The `data.columns` keys that mean something for this schema."""
    fields = {**_REQUIRED[schema], **_OPTIONAL.get(schema, {}), "system": _SYSTEM_FIELD}
    return {key for keys, _defaults in fields.values() for key in keys}


def detect_schema(columns: Iterable[str], columns_map: Mapping[str, str] | None = None) -> str:
    """Pick the input schema from the column names; raise ValueError naming what was expected.

    When several schemas fit, the one whose fields `data.columns` mentions most wins, so
    `{prompt: instruction, response: output}` means prompt/response even on an Alpaca file.
    """
    columns_map = columns_map or {}
    available = list(columns)
    best: tuple[int, int, str] | None = None
    for order, schema in enumerate(_DETECTION_ORDER):
        _resolved, missing = resolve_columns(schema, available, columns_map)
        if missing:
            continue
        score = sum(1 for key in columns_map if key in schema_keys(schema) - {"system"})
        if best is None or (-score, order) < (best[0], best[1]):
            best = (-score, order, schema)
    if best is None:
        raise ValueError(
            f"cannot detect the input format from columns {sorted(available)}; "
            + _nearest_format(available, columns_map)
            + "expected one of: "
            + "; ".join(f"{s} ({expected_columns(s)})" for s in SCHEMAS)
            + ". Set data.schema and map your columns with data.columns, for example "
            "{prompt: <prompt column>, response: <response column>}"
        )
    return best[2]


def _nearest_format(available: list[str], columns_map: Mapping[str, str]) -> str:
    """ "looks like alpaca, but column `output` is missing; " for the schema with most of its
    required columns present (none present: nothing to say)."""
    best: tuple[int, int, str, list[str]] | None = None
    for order, schema in enumerate(_DETECTION_ORDER):
        _resolved, missing = resolve_columns(schema, available, columns_map)
        present = len(_REQUIRED[schema]) - len(missing)
        if present and (best is None or (-present, len(missing), order) < best[:3]):
            best = (-present, len(missing), order, [schema, *missing])  # type: ignore[list-item]
    if best is None:
        return ""
    schema, *missing = best[3]
    names = " and ".join(f"`{'|'.join(_REQUIRED[schema][m][1])}`" for m in missing)
    plural = "s" if len(missing) > 1 else ""
    return f"looks like {schema}, but column{plural} {names} {'are' if plural else 'is'} missing; "


def _maybe_json_list(value: Any) -> Any:
    # CSV and some Parquet exports store conversations as JSON strings; decode when it is a list.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def _normalize_turns(turns: Any) -> Any:
    """Map each turn to {role, content}; `from`/`value` turns use ShareGPT role names.

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
            normalized.append({"role": turn.get("role"), "content": turn.get("content")})
        else:
            role = turn.get("from")
            # Unknown ShareGPT roles (function_call, observation) are kept so validation names them.
            role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
            normalized.append({"role": role, "content": turn.get("value")})
    return normalized


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
    row: Mapping[str, Any], schema: str, columns: Mapping[str, str] | None = None
) -> tuple[str, Any, str]:
    """Map one input row to (format, messages, text); `columns` maps our fields to row keys."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    # A row lacking a field (that other rows have) reads as None, for validation to report.
    resolved, _missing = resolve_columns(schema, row.keys(), columns)

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
    turns = _normalize_turns(value(field))
    if prefix and isinstance(turns, list):
        turns = prefix + turns
    return schema, turns, ""


def make_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Canonical records DataFrame with fixed column order and plain str/int64 dtypes."""
    return pd.DataFrame(
        {
            name: pd.Series(
                [row[name] for row in rows], dtype="int64" if name in _INT_COLUMNS else "str"
            )
            for name in RECORD_COLUMNS
        }
    )
