"""The input formats: one entry per format, with everything the project knows about it.

An `InputFormat` names its required and optional fields, the `data.columns` keys that may rename
each field and the usual dataset column names of each (Alpaca's `output` also answers to
`response`), and how one row becomes the canonical record's turns or text. Everything else is
derived from `FORMATS`: the allowed `data.columns` keys (`COLUMN_KEYS`: the parameter check of
`sft_pipeline.common.config` refuses any other, naming the nearest), detection from a file's
columns (`detect_schema`), the column resolution of a file (`file_format`), the descriptions in
messages. Adding a format is adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sft_pipeline.common.config import DataConfig
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data.turns import normalize_turns

# Records whose columns decide a JSON file's format (CSV and Parquet files declare theirs).
DETECT_ROWS = 1000


@dataclass(frozen=True)
class Field:
    """One of our fields: the `data.columns` keys that may rename it, and its usual columns."""

    keys: tuple[str, ...]
    columns: tuple[str, ...]


def _field(*names: str) -> Field:
    return Field(names, names)


# Every format but text also takes a system prompt and images (paths, `{"bytes", "path"}`
# structs or PIL images); text takes a system column that it does not render.
_SYSTEM = _field("system")
_IMAGES = Field(("images",), ("images", "image"))
_TOOLS = _field("tools")
Value = Callable[[str], Any]  # our field -> the row's value (None when the row lacks it)


@dataclass(frozen=True)
class InputFormat:
    """A format: its fields, and `convert(value) -> (turns, text)` from a row's field values
    (turns before the system prompt is put in front)."""

    name: str
    required: dict[str, Field]
    convert: Callable[[Value], tuple[Any, str]]
    optional: dict[str, Field] = field(default_factory=dict)
    turns_field: str | None = None  # the field holding messages as found (dropped keys)

    @property
    def fields(self) -> dict[str, Field]:
        """Every field of the format, required first."""
        fields = {**self.required, **self.optional, "system": _SYSTEM}
        if self.name != "text":
            fields["images"] = _IMAGES
        return fields


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _alpaca_prompt(instruction: Any, extra: Any) -> Any:
    if _is_blank(extra):
        return instruction
    if isinstance(instruction, str) and isinstance(extra, str):
        return f"{instruction}\n\n{extra}"
    # A non-string part cannot be joined without hiding it; keep both so validation reports it.
    return {"instruction": instruction, "input": extra}


def _exchange(prompt: Any, response: Any) -> tuple[Any, str]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], ""


def _text(value: Value) -> tuple[Any, str]:
    text = value("text")
    return [], text if isinstance(text, str) else ""


def _conversation(name: str, column: str) -> InputFormat:
    """A format whose turns are one column of messages (`{role, content}` or ShareGPT's
    `{from, value}`), with the record's tools in another."""
    return InputFormat(
        name,
        {column: _field(column)},
        lambda value: (normalize_turns(value(column)), ""),
        optional={"tools": _TOOLS},
        turns_field=column,
    )


# In the order messages list them; `_DETECTION_ORDER` below decides detection.
FORMATS = {
    fmt.name: fmt
    for fmt in (
        InputFormat(
            "prompt_response",
            {"prompt": _field("prompt"), "response": _field("response", "completion")},
            lambda value: _exchange(value("prompt"), value("response")),
        ),
        InputFormat(
            "alpaca",
            {"instruction": _field("instruction"), "output": _field("output", "response")},
            lambda value: _exchange(
                _alpaca_prompt(value("instruction"), value("input")), value("output")
            ),
            optional={"input": _field("input")},
        ),
        _conversation("messages", "messages"),
        _conversation("sharegpt", "conversations"),
        InputFormat("text", {"text": _field("text")}, _text),
    )
}
SCHEMAS = tuple(FORMATS)
# Auto-detection tries formats in this order; the first is also the tie-breaker.
_DETECTION_ORDER = ("messages", "sharegpt", "prompt_response", "alpaca", "text")
# Every key `data.columns` may use, in the order formats list them.
COLUMN_KEYS = tuple(
    dict.fromkeys(key for fmt in FORMATS.values() for f in fmt.fields.values() for key in f.keys)
)


def optional_fields(schema: str) -> dict[str, Field]:
    """The optional fields of a schema (besides `system` and `images`)."""
    return FORMATS[schema].optional


def _lookup(field: Field, available: Iterable[str], columns_map: Mapping[str, str]) -> str | None:
    """The dataset column holding a field, or None. An explicit mapping is never second-guessed."""
    present = set(available)
    for key in field.keys:
        if key in columns_map:
            return columns_map[key] if columns_map[key] in present else None
    return next((name for name in field.columns if name in present), None)


def resolve_columns(
    schema: str, available: Iterable[str], columns_map: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """(our field -> dataset column for every field found, required fields not found)."""
    columns_map = columns_map or {}
    available = list(available)
    fmt = FORMATS[schema]
    resolved: dict[str, str] = {}
    missing: list[str] = []
    for name, fld in fmt.fields.items():
        column = _lookup(fld, available, columns_map)
        if column is not None:
            resolved[name] = column
        elif name in fmt.required:
            missing.append(name)
    return resolved, missing


def expected_columns(schema: str) -> str:
    """Human description of a schema's columns: `instruction, output|response; optional: ...`."""
    fmt = FORMATS[schema]
    parts = ["|".join(f.columns) for f in fmt.required.values()]
    optional = [f.columns[0] for f in fmt.optional.values()] + ["system"]
    return ", ".join(parts) + "; optional: " + ", ".join(optional)


def schema_keys(schema: str) -> set[str]:
    """The `data.columns` keys that mean something for this schema."""
    return {key for f in FORMATS[schema].fields.values() for key in f.keys}


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
        present = len(FORMATS[schema].required) - len(missing)
        if present and (best is None or (-present, len(missing), order) < best[:3]):
            best = (-present, len(missing), order, [schema, *missing])  # type: ignore[list-item]
    if best is None:
        return ""
    schema, *missing = best[3]
    names = " and ".join(f"`{'|'.join(FORMATS[schema].required[m].columns)}`" for m in missing)
    plural = "s" if len(missing) > 1 else ""
    return f"looks like {schema}, but column{plural} {names} {'are' if plural else 'is'} missing; "


def file_format(shown: str, columns: list[str], cfg: DataConfig) -> tuple[str, dict[str, str]]:
    """(schema, our field -> column) for one file; a missing required column stops the run."""
    schema = cfg.schema_
    if schema == "auto":
        try:
            schema = detect_schema(columns, cfg.columns)
        except ValueError as exc:
            raise InputFileError(shown, str(exc)) from None
    absent = sorted(
        f"{key}: {name}"
        for key, name in cfg.columns.items()
        if key in schema_keys(schema) and name not in columns
    )
    if absent:
        # An explicit mapping to a column the file lacks is a typo, even for optional fields.
        raise InputFileError(
            shown,
            f"data.columns names column(s) the file does not have ({', '.join(absent)}); "
            f"columns found: {columns}",
            expected=f"columns {expected_columns(schema)} for data.schema={schema}",
        )
    resolved, missing = resolve_columns(schema, columns, cfg.columns)
    if missing:
        raise InputFileError(
            shown,
            f"missing required column(s) {missing} for data.schema={schema}; "
            f"columns found: {columns}",
            expected=f"columns {expected_columns(schema)}",
            hint="Map your column names with data.columns, e.g. "
            "{" + ", ".join(f"{name}: <your column>" for name in missing) + "}",
        )
    return schema, resolved
