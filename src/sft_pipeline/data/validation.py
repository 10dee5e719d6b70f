"""Record-level validation with pandera: quarantine bad records with every reason, keep the rest.

Each rule is a pandera check named by a stable reason code. pandera finds the failing rows (lazy
validation collects all of them at once); the rule's `explain` then says, for each failing row,
exactly what is wrong ("empty_content: message 2 (assistant) is empty after stripping").
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from sft_pipeline.common.config import ValidationConfig
from sft_pipeline.common.errors import RejectedFractionError
from sft_pipeline.data import image_checks, images, value_checks
from sft_pipeline.data.records import NOT_JSON, RECORD_COLUMNS, SCHEMAS, loads_tools
from sft_pipeline.data.seen_ids import SeenIds

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")

# A record as the rules see it: {"format": str, "turns": parsed messages, "text": str,
# "tools": parsed tool definitions or None, "image_problems": what is wrong with its images,
# checked once (file, decoding, size limits)}.
View = dict[str, Any]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict) and NOT_JSON in value:  # stored tagged: bytes, ...
        return value_checks.type_name(value)
    names = {dict: "object", list: "list", str: "string", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def _dict_turns(view: View) -> list[tuple[int, dict[str, Any]]]:
    """(1-based position, turn) for every turn that is an object; other shapes have own rules."""
    turns = view["turns"]
    if not isinstance(turns, list):
        return []
    return [(i, t) for i, t in enumerate(turns, 1) if isinstance(t, dict)]


def _label(i: int, turn: dict[str, Any]) -> str:
    return f"message {i} ({turn.get('role')})"


def _bad_messages(view: View, _cfg: ValidationConfig) -> list[str]:
    if isinstance(view["turns"], list):
        return []
    return [
        f"messages is not a list of {{role, content}} objects (got {_type_name(view['turns'])})"
    ]


def _bad_turn(view: View, _cfg: ValidationConfig) -> list[str]:
    turns = view["turns"] if isinstance(view["turns"], list) else []
    return [
        f"message {i} is not an object with role and content (got {_type_name(t)})"
        for i, t in enumerate(turns, 1)
        if not isinstance(t, dict)
    ]


def _content_not_string(view: View, _cfg: ValidationConfig) -> list[str]:
    problems = []
    for i, t in _dict_turns(view):
        content = t.get("content")
        if isinstance(content, str):
            continue
        if _has_images(view) and isinstance(content, list):
            # A conversation with images has parts: text parts hold strings, image parts images.
            problems.extend(
                f"{_label(i, t)}: part {k} is not a text or image part (got {_part_name(p)})"
                for k, p in enumerate(content, 1)
                if not _is_text_part(p) and not _is_image_part(p)
            )
            continue
        problems.append(f"{_label(i, t)}: content is not a string (got {_type_name(content)})")
    return problems


def _has_images(view: View) -> bool:
    return bool(images.image_parts(view["turns"]))


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _part_name(part: Any) -> str:
    return f"type {part.get('type')!r}" if isinstance(part, dict) else _type_name(part)


def _text_of(content: Any) -> str | None:
    """The text of string or parts content (None when neither)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if _is_text_part(p))
    return None


def _empty_content(view: View, _cfg: ValidationConfig) -> list[str]:
    # A turn that calls tools may say nothing besides the calls.
    return [
        f"{_label(i, t)} is empty after stripping"
        for i, t in _dict_turns(view)
        if (text := _text_of(t.get("content"))) is not None
        and not text.strip()
        and "tool_calls" not in t
        and not (isinstance(t["content"], list) and any(map(_is_image_part, t["content"])))
    ]


def _image_count(view: View, _cfg: ValidationConfig) -> list[str]:
    parts = images.image_parts(view["turns"])
    placeholders = sum(1 for p in parts if p.get("placeholder", True))
    found = sum(1 for p in parts if any(p.get(k) for k in images.SOURCE_KEYS) or "given" in p)
    if placeholders == found:
        return []
    return [f"the conversation has {placeholders} image placeholder(s) but {found} image(s)"]


def _image_missing(view: View, _cfg: ValidationConfig) -> list[str]:
    return [p for p in view["image_problems"] if image_checks.is_missing(p)]


def _image_unreadable(view: View, _cfg: ValidationConfig) -> list[str]:
    return [p for p in view["image_problems"] if not image_checks.is_missing(p)]


def _image_not_in_user_turn(view: View, _cfg: ValidationConfig) -> list[str]:
    return [
        f"{_label(i, t)} holds an image; images belong to user (or system) turns"
        for i, t in _dict_turns(view)
        if t.get("role") == "assistant"
        and isinstance(t.get("content"), list)
        and any(_is_image_part(p) for p in t["content"])
    ]


def _unknown_role(view: View, _cfg: ValidationConfig) -> list[str]:
    return [
        f"message {i} has unknown role {t.get('role')!r}; expected one of {', '.join(ROLES)}"
        for i, t in _dict_turns(view)
        if t.get("role") not in ROLES
    ]


def _calls(turn: dict[str, Any]) -> bool:
    return turn.get("role") == "assistant" and "tool_calls" in turn


def _not_alternating(view: View, _cfg: ValidationConfig) -> list[str]:
    """User and assistant alternate after one optional system message; an assistant turn that
    calls tools is followed by their results (`tool` turns), and those by the assistant."""
    # Unknown roles are reported by their own rule, and so are tool results that answer no call
    # (`orphan_tool_result`); the order is judged on the rest.
    known = [(i, t) for i, t in _dict_turns(view) if t.get("role") in ROLES]
    problems = []
    if known and known[0][1]["role"] == "system":
        known = known[1:]
    expected = ("user",)
    for i, turn in known:
        role = turn["role"]
        if role == "system":
            problems.append(f"message {i} is a system message; only one, first, is allowed")
            continue
        if role == "tool" and "tool" not in expected:
            continue
        if role not in expected:
            if expected[0] == "tool":
                problems.append(
                    f"message {i} ({role}) where the result of the tool call before it was "
                    "expected (a `tool` message answers each call)"
                )
            else:
                problems.append(
                    f"message {i} ({role}) where {' or '.join(expected)} was expected "
                    "(turns alternate user/assistant after one optional system message)"
                )
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if _calls(turn) else ("user",)
        else:
            expected = ("tool", "assistant")
    return problems


def _missing_turn(role: str) -> Callable[[View, ValidationConfig], list[str]]:
    def rule(view: View, _cfg: ValidationConfig) -> list[str]:
        if view["format"] == "text" or not isinstance(view["turns"], list):
            return []
        if any(t.get("role") == role for _i, t in _dict_turns(view)):
            return []
        return [f"the conversation has no {role} message"]

    return rule


def _last_not_assistant(view: View, cfg: ValidationConfig) -> list[str]:
    turns = view["turns"]
    if not cfg.require_assistant_last or not isinstance(turns, list) or not turns:
        return []
    last = turns[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        return []
    role = last.get("role") if isinstance(last, dict) else _type_name(last)
    return [f"the last message ({len(turns)}, {role}) is not the assistant's"]


def _empty_text(view: View, _cfg: ValidationConfig) -> list[str]:
    if view["format"] != "text" or view["text"].strip():
        return []
    return ["text is empty after stripping (or not a string)"]


def _too_long(view: View, cfg: ValidationConfig) -> list[str]:
    turns = view["turns"] if isinstance(view["turns"], list) else []
    # An assistant's reasoning is rendered too (Qwen3's <think> block).
    chars = len(view["text"]) + sum(
        len(_text_of(t.get("content")) or "") + len(_text_of(t.get("reasoning_content")) or "")
        for t in turns
        if isinstance(t, dict)
    )
    # Tool calls and tool definitions are rendered into the text as well.
    chars += sum(
        len(json.dumps(t["tool_calls"])) for t in turns if isinstance(t, dict) and _calls(t)
    )
    if view["tools"] is not None:
        chars += len(json.dumps(view["tools"]))
    if chars <= cfg.max_chars:
        return []
    return [f"{chars} characters, over validation.max_chars={cfg.max_chars}"]


# --- tools ---------------------------------------------------------------------------------------


def _declared(tools: Any) -> list[str] | None:
    """Names of the functions `tools` declares; None when the record has no usable tools."""
    if not isinstance(tools, list):
        return None
    names = [_function_name(tool) for tool in tools]
    return [n for n in names if n is not None] or None


def _function_name(entry: Any) -> str | None:
    function = entry.get("function") if isinstance(entry, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def _bad_tools(view: View, _cfg: ValidationConfig) -> list[str]:
    tools = view["tools"]
    if tools is None:
        return []
    if isinstance(tools, str):  # stored as found because it did not parse
        return [f"tools is not valid JSON ({_json_error(tools)}); expected a list of functions"]
    if not isinstance(tools, list):
        return [f"tools is not a list of function definitions (got {_type_name(tools)})"]
    return [
        f"tool {k} is not a function definition with a name "
        f'({{"type": "function", "function": {{"name", "parameters"}}}} or '
        f'{{"name", "parameters"}}; got {json.dumps(tool, default=str)[:80]})'
        for k, tool in enumerate(tools, 1)
        if _function_name(tool) is None
    ]


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return str(exc)
    return "a JSON string holding JSON: encoded twice"


def _call_problems(call: Any) -> list[str]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return [f"is not an object with a function name and arguments (got {_type_name(call)})"]
    function = call["function"]
    problems = []
    if _function_name(call) is None:
        problems.append(f"has no function name (got {_type_name(function.get('name'))})")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        problems.append(f"arguments do not parse as JSON ({_json_error(arguments)})")
    elif not isinstance(arguments, dict):
        problems.append(f"arguments are not a JSON object (got {_type_name(arguments)})")
    return problems


def _malformed_tool_call(view: View, _cfg: ValidationConfig) -> list[str]:
    problems = []
    for i, turn in _dict_turns(view):
        if not _calls(turn):
            continue
        calls = turn["tool_calls"]
        if isinstance(calls, str):
            problems.append(f"{_label(i, turn)}: the tool call is not JSON ({_json_error(calls)})")
        elif not isinstance(calls, list) or not calls:
            problems.append(
                f"{_label(i, turn)}: tool_calls is not a non-empty list (got {_type_name(calls)})"
            )
        else:
            problems.extend(
                f"{_label(i, turn)}: tool call {k} {problem}"
                for k, call in enumerate(calls, 1)
                for problem in _call_problems(call)
            )
    return problems


def _undeclared_function(view: View, _cfg: ValidationConfig) -> list[str]:
    declared = _declared(view["tools"])
    if declared is None:  # no tools given: nothing to check calls against
        return []
    return [
        f"{_label(i, turn)}: tool call {k} calls {name!r}, which tools does not declare "
        f"(declared: {', '.join(declared)})"
        for i, turn in _dict_turns(view)
        if _calls(turn) and isinstance(turn["tool_calls"], list)
        for k, call in enumerate(turn["tool_calls"], 1)
        if (name := _function_name(call)) is not None and name not in declared
    ]


def _orphan_tool_result(view: View, _cfg: ValidationConfig) -> list[str]:
    """Every tool result answers a call of the assistant turn right before its block of
    results: one result per call, with a matching `tool_call_id` / `name` where given."""
    problems = []
    calls: list[Any] | None = None  # the calls the current block of results answers
    caller, answered = 0, 0
    for i, turn in _dict_turns(view):
        role = turn.get("role")
        if role != "tool":
            calls, caller, answered = (turn["tool_calls"], i, 0) if _calls(turn) else (None, 0, 0)
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
    names = [n for c in calls if (n := _function_name(c)) is not None]
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


@dataclass(frozen=True)
class Rule:
    code: str
    explain: Callable[[View, ValidationConfig], list[str]]


RULES = (
    Rule("bad_messages", _bad_messages),
    Rule("bad_turn", _bad_turn),
    Rule("content_not_string", _content_not_string),
    Rule("unsupported_value", value_checks.unsupported_values),
    Rule("empty_content", _empty_content),
    Rule("unknown_role", _unknown_role),
    Rule("not_alternating", _not_alternating),
    Rule("bad_tools", _bad_tools),
    Rule("malformed_tool_call", _malformed_tool_call),
    Rule("undeclared_function", _undeclared_function),
    Rule("orphan_tool_result", _orphan_tool_result),
    Rule("no_user_turn", _missing_turn("user")),
    Rule("no_assistant_turn", _missing_turn("assistant")),
    Rule("last_not_assistant", _last_not_assistant),
    Rule("empty_text", _empty_text),
    Rule("too_long", _too_long),
    Rule("image_count", _image_count),
    Rule("image_missing", _image_missing),
    Rule("image_unreadable", _image_unreadable),
    Rule("image_in_assistant_turn", _image_not_in_user_turn),
)
DUPLICATE = "duplicate"


def build_schema(cfg: ValidationConfig) -> pa.DataFrameSchema:
    """pandera schema over the validation view: one named check per rule."""
    record_checks = [
        pa.Check(
            lambda view, rule=rule: not rule.explain(view, cfg), element_wise=True, name=rule.code
        )
        for rule in RULES
    ]
    id_checks = []
    if cfg.reject_duplicates:
        id_checks.append(pa.Check(lambda ids: ~ids.duplicated(keep="first"), name=DUPLICATE))
    return pa.DataFrameSchema(
        {
            "record_id": pa.Column(str, id_checks, nullable=False),
            "source_file": pa.Column(str, nullable=False),
            "source_row": pa.Column(int, pa.Check.ge(1), nullable=False),
            "format": pa.Column(str, pa.Check.isin(SCHEMAS), nullable=False),
            "text": pa.Column(str, nullable=False),
            "record": pa.Column(object, record_checks, nullable=False),
        },
        strict=True,
    )


def _view_frame(records: pd.DataFrame, cfg: ValidationConfig) -> pd.DataFrame:
    """The canonical columns as stored, plus `record`: the parsed view the rules check."""
    views = []
    for fmt, messages, text, tools in zip(
        records["format"], records["messages"], records["text"], records["tools"], strict=True
    ):
        turns = json.loads(messages)
        views.append(
            {
                "format": fmt,
                "turns": turns,
                "text": text,
                "tools": loads_tools(tools),
                "image_problems": image_checks.problems(turns, cfg),
            }
        )
    frame = records[["record_id", "source_file", "source_row", "format", "text"]].copy()
    frame["record"] = pd.Series(views, index=records.index, dtype=object)
    return frame


def _failures(frame: pd.DataFrame, schema: pa.DataFrameSchema) -> dict[int, set[str]]:
    """Row position -> codes of the checks pandera found failing there."""
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        structural = cases[~cases["check"].isin([rule.code for rule in RULES] + [DUPLICATE])]
        if len(structural):
            # Not a bad record but a malformed artifact (dtype, nulls, unknown format): a bug
            # upstream of validation, so stop rather than quarantine.
            raise ValueError(
                "records do not match the canonical schema:\n" + structural.to_string()
            ) from None
        failed: dict[int, set[str]] = {}
        for index, check in zip(cases["index"], cases["check"], strict=True):
            failed.setdefault(int(index), set()).add(str(check))
        return failed
    return {}


def _validate_chunk(
    records: pd.DataFrame, cfg: ValidationConfig, schema, seen: SeenIds
) -> tuple[pd.DataFrame, list[dict[str, Any]], Counter[str]]:
    """One chunk: (valid records, rejected rows with every reason, reason counts)."""
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack canonical columns {missing}; got {list(records.columns)}")
    records = records[RECORD_COLUMNS].reset_index(drop=True)
    frame = _view_frame(records, cfg)
    failed = _failures(frame, schema)

    # Duplicates of records in earlier chunks: the same rule as pandera's within the chunk.
    keys = np.fromiter((seen.key(r) for r in records["record_id"]), np.uint64, len(records))
    earlier = seen.first(keys) if cfg.reject_duplicates else [None] * len(records)
    for position, where in enumerate(earlier):
        if where is not None:
            failed.setdefault(position, set()).add(DUPLICATE)
    first_seen: dict[str, int] = {}
    for position, record_id in enumerate(records["record_id"]):
        first_seen.setdefault(record_id, position)

    rejected: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for position in sorted(failed):
        codes = failed[position]
        view = frame.at[position, "record"]
        reasons = [
            f"{rule.code}: {text}"
            for rule in RULES
            if rule.code in codes
            for text in rule.explain(view, cfg)
        ]
        if DUPLICATE in codes:
            where = earlier[position]
            if where is None:
                first = first_seen[records.at[position, "record_id"]]
                where = (records.at[first, "source_file"], records.at[first, "source_row"])
            reasons.append(f"{DUPLICATE}: same content as {where[0]}:{where[1]} (kept the first)")
        counts.update(codes)
        rejected.append(
            {
                "record_id": records.at[position, "record_id"],
                "source_file": records.at[position, "source_file"],
                "source_row": int(records.at[position, "source_row"]),
                "reasons": reasons,
                "record": json.loads(records.at[position, "raw"]),
            }
        )
    if cfg.reject_duplicates:
        new = np.array([where is None for where in earlier], dtype=bool)
        firsts = sorted(p for r, p in first_seen.items() if new[p])
        seen.add(
            keys[firsts],
            [records.at[p, "source_file"] for p in firsts],
            records["source_row"].to_numpy(np.int64)[firsts],
        )
    valid = records[~records.index.isin(list(failed))].reset_index(drop=True)
    return valid, rejected, counts


def _report(ingested: int, valid: int, rejected: int, counts: Counter[str]) -> dict[str, Any]:
    report = {
        "ingested": ingested,
        "valid": valid,
        "rejected": rejected,
        "rejected_fraction": rejected / ingested if ingested else 0.0,
        "reasons": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    log.info(
        "validated %d records: %d valid + %d rejected (%.1f%%)",
        ingested,
        report["valid"],
        report["rejected"],
        100 * report["rejected_fraction"],
    )
    if counts:
        log.warning("rejection reasons (records per code): %s", report["reasons"])
    return report


def validate_stream(records, cfg: ValidationConfig):
    """Validate canonical records chunk by chunk over a `RecordTable` (or DataFrame), the same
    pandera schema on each chunk: valid records and rejects stream into spool files, so memory
    stays flat.

    Returns (valid `RecordTable`, rejected `JSONLines`, counts report)."""
    from sft_pipeline.data.streams import JSONLinesSpool, ParquetSpool, Progress, iter_record_frames

    schema, seen = build_schema(cfg), SeenIds()
    valid_out, rejected_out = ParquetSpool("valid_records"), JSONLinesSpool("rejected_records")
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()  # per-message keys ingestion left out, by messages
    progress = Progress("validate_records", len(records))
    for chunk in iter_record_frames(records):
        valid, rejected, chunk_counts = _validate_chunk(chunk, cfg, schema, seen)
        valid_out.write(valid)
        rejected_out.write(rejected)
        counts.update(chunk_counts)
        value_checks.count_dropped(chunk["dropped_keys"], dropped)
        progress.update(len(chunk))
    progress.finish()
    report = _report(progress.done, valid_out.rows, rejected_out.rows, counts)
    report["dropped_message_keys"] = dict(sorted(dropped.items()))
    if dropped:
        log.warning(
            "per-message keys no chat template reads were left out of the messages (messages "
            "per key): %s",
            report["dropped_message_keys"],
        )
    return valid_out.close(), rejected_out.close(), report


def check_rejected_fraction(
    report: dict[str, Any], cfg: ValidationConfig, rejects_path: str
) -> None:
    """Stop the run when too many records were rejected, pointing at the rejects report."""
    fraction = report["rejected_fraction"]
    top = ", ".join(f"{code} ({n})" for code, n in list(report["reasons"].items())[:5])
    if report["ingested"] and not report["valid"]:
        raise RejectedFractionError(
            f"all {report['ingested']} records were rejected, nothing is left to train on; "
            f"see {rejects_path} for every record's reasons. Top reasons: {top}"
        )
    if fraction > cfg.max_rejected_fraction:
        raise RejectedFractionError(
            f"{report['rejected']} of {report['ingested']} records ({fraction:.1%}) were rejected, "
            f"over validation.max_rejected_fraction={cfg.max_rejected_fraction}; "
            f"see {rejects_path} for every record's reasons. Top reasons: {top}. "
            "Fix the data, map columns with data.columns, or raise the threshold"
        )
