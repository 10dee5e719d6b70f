"""Canonical records: every input format maps to a list of `{role, content}` messages or plain text.

The mapping keeps content and roles exactly as found (a number where a string belongs, an unknown
role): deciding what is acceptable is validation's job, so a bad record is reported with its
reasons instead of being dropped or crashing ingestion. Each format's fields and conversion live
in its entry of `sft_pipeline.data.schemas.FORMATS`; messages and tools take the canonical shape
of `sft_pipeline.data.turns` (OpenAI's, whatever the input's), and a record without tools has the
same content id as before tools existed.

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
    FORMATS,
    SCHEMAS,
    detect_schema,
    expected_columns,
    optional_fields,
    resolve_columns,
    schema_keys,
)
from sft_pipeline.data.turns import (
    MESSAGE_KEYS,
    NOT_JSON,
    SHAREGPT_ROLES,
    canonical_tools,
    dropped_message_keys,
    loads_tools,
    normalize_turns,
    not_json,
    tool_calls,
)

# Importers of the record mapping also find the format and turn functions here.
__all__ = [
    "MESSAGE_KEYS",
    "NOT_JSON",
    "RECORD_COLUMNS",
    "SCHEMAS",
    "SHAREGPT_ROLES",
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
    "source",
]
_INT_COLUMNS = {"source_row"}
# Columns a row may leave out (records made before the column existed).
_DEFAULTS = {"tools": "", "dropped_keys": "", "source": ""}


def content_id(messages: Any, text: str, tools: str = "") -> str:
    """First 16 hex chars of sha256 over the canonical content (same content -> same id).

    `tools` (the `tools` column) takes part only when the record has tools, so records without
    them keep the ids they had before tools were part of a record."""
    content: dict[str, Any] = {"messages": messages, "text": text}
    if tools:
        content["tools"] = json.loads(tools)
    payload = json.dumps(content, sort_keys=True, ensure_ascii=False, default=not_json)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def dumps_messages(messages: Any) -> str:
    """Serialize messages for the `messages` column (key order kept: role, content)."""
    return json.dumps(messages, ensure_ascii=False, default=not_json)


def dumps_raw(row: Mapping[str, Any]) -> str:
    """The original record as JSON, for the rejects report (non-JSON values become strings)."""
    return json.dumps(dict(row), ensure_ascii=False, default=str)


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
    if schema not in FORMATS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {', '.join(SCHEMAS)}")
    # A row lacking a field (that other rows have) reads as None, for validation to report.
    resolved, _missing = resolve_columns(schema, row.keys(), columns)

    def value(name: str) -> Any:
        return row.get(resolved[name]) if name in resolved else None

    turns, text = FORMATS[schema].convert(value)
    if schema == "text":
        return schema, turns, text
    system = value("system")
    if isinstance(turns, list) and not (
        system is None or (isinstance(system, str) and not system.strip())
    ):
        turns = [{"role": "system", "content": system}, *turns]
    images_column = resolved.get("images")
    images = row.get(images_column) if images_column else None
    if has_images(images, turns, placeholders=bool(images_column)):
        turns = attach_images(turns, images, image_root, digest_images)
    return schema, turns, text


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
    field = FORMATS[schema].turns_field
    if field is None:
        return ""
    resolved, _missing = resolve_columns(schema, row.keys(), columns)
    counts = dropped_message_keys(row.get(resolved[field])) if field in resolved else {}
    return json.dumps(counts) if counts else ""


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
