"""Input schemas: which columns make which format, and which column holds each of our fields.

Each schema names its required and optional fields; each field answers to the `data.columns`
keys that may rename it and to its usual dataset column names (Alpaca's `output` also to
`response`). A file's format is detected from its columns (`detect_schema`), or named with
`data.schema`; a format that cannot be detected names the nearest one and its missing columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
_TOOLS_FIELD = (("tools",), ("tools",))
_OPTIONAL: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "alpaca": {"input": (("input",), ("input",))},
    "messages": {"tools": _TOOLS_FIELD},
    "sharegpt": {"tools": _TOOLS_FIELD},
}
_SYSTEM_FIELD = (("system",), ("system",))
# Images of a conversation (any schema but text): paths, `{"bytes", "path"}` structs or PIL images.
_IMAGES_FIELD = (("images",), ("images", "image"))


def optional_fields(schema: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The optional fields of a schema (besides `system` and `images`)."""
    return _OPTIONAL.get(schema, {})


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
    if schema != "text":
        column = _lookup(_IMAGES_FIELD, available, columns_map)
        if column is not None:
            resolved["images"] = column
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
    if schema != "text":
        fields["images"] = _IMAGES_FIELD
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
        score = sum(1 for key in columns_map if key in schema_keys(schema) - {"system", "images"})
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
