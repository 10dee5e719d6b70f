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
from sft_pipeline.data.records import RECORD_COLUMNS, SCHEMAS
from sft_pipeline.data.seen_ids import SeenIds

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# A record as the rules see it: {"format": str, "turns": parsed messages, "text": str}.
View = dict[str, Any]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
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
    return [
        f"{_label(i, t)}: content is not a string (got {_type_name(t.get('content'))})"
        for i, t in _dict_turns(view)
        if not isinstance(t.get("content"), str)
    ]


def _empty_content(view: View, _cfg: ValidationConfig) -> list[str]:
    return [
        f"{_label(i, t)} is empty after stripping"
        for i, t in _dict_turns(view)
        if isinstance(t.get("content"), str) and not t["content"].strip()
    ]


def _unknown_role(view: View, _cfg: ValidationConfig) -> list[str]:
    return [
        f"message {i} has unknown role {t.get('role')!r}; expected one of {', '.join(ROLES)}"
        for i, t in _dict_turns(view)
        if t.get("role") not in ROLES
    ]


def _not_alternating(view: View, _cfg: ValidationConfig) -> list[str]:
    # Unknown roles are reported by their own rule; the order is judged on the known ones.
    known = [(i, t["role"]) for i, t in _dict_turns(view) if t.get("role") in ROLES]
    problems = []
    if known and known[0][1] == "system":
        known = known[1:]
    expected = "user"
    for i, role in known:
        if role == "system":
            problems.append(f"message {i} is a system message; only one, first, is allowed")
            continue
        if role != expected:
            problems.append(
                f"message {i} ({role}) where {expected} was expected "
                "(turns alternate user/assistant after one optional system message)"
            )
        expected = "assistant" if role == "user" else "user"
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
    chars = len(view["text"]) + sum(
        len(t["content"])
        for t in turns
        if isinstance(t, dict) and isinstance(t.get("content"), str)
    )
    if chars <= cfg.max_chars:
        return []
    return [f"{chars} characters, over validation.max_chars={cfg.max_chars}"]


@dataclass(frozen=True)
class Rule:
    code: str
    explain: Callable[[View, ValidationConfig], list[str]]


RULES = (
    Rule("bad_messages", _bad_messages),
    Rule("bad_turn", _bad_turn),
    Rule("content_not_string", _content_not_string),
    Rule("empty_content", _empty_content),
    Rule("unknown_role", _unknown_role),
    Rule("not_alternating", _not_alternating),
    Rule("no_user_turn", _missing_turn("user")),
    Rule("no_assistant_turn", _missing_turn("assistant")),
    Rule("last_not_assistant", _last_not_assistant),
    Rule("empty_text", _empty_text),
    Rule("too_long", _too_long),
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


def _view_frame(records: pd.DataFrame) -> pd.DataFrame:
    """The canonical columns as stored, plus `record`: the parsed view the rules check."""
    views = [
        {"format": fmt, "turns": json.loads(messages), "text": text}
        for fmt, messages, text in zip(
            records["format"], records["messages"], records["text"], strict=True
        )
    ]
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
    frame = _view_frame(records)
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


def validate(
    records: pd.DataFrame, cfg: ValidationConfig
) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, Any]]:
    """Split canonical records into (valid, rejected rows with every reason, counts report)."""
    valid, rejected, counts = _validate_chunk(records, cfg, build_schema(cfg), SeenIds())
    return valid, rejected, _report(len(records), len(valid), len(rejected), counts)


def validate_stream(records, cfg: ValidationConfig):
    """`validate` chunk by chunk over a `RecordTable` (or DataFrame), the same pandera schema on
    each chunk: valid records and rejects stream into spool files, so memory stays flat.

    Returns (valid `RecordTable`, rejected `JSONLines`, counts report)."""
    from sft_pipeline.data.streams import JSONLinesSpool, ParquetSpool, Progress, iter_record_frames

    schema, seen = build_schema(cfg), SeenIds()
    valid_out, rejected_out = ParquetSpool("valid_records"), JSONLinesSpool("rejected_records")
    counts: Counter[str] = Counter()
    progress = Progress("validate_records", len(records))
    for chunk in iter_record_frames(records):
        valid, rejected, chunk_counts = _validate_chunk(chunk, cfg, schema, seen)
        valid_out.write(valid)
        rejected_out.write(rejected)
        counts.update(chunk_counts)
        progress.update(len(chunk))
    progress.finish()
    report = _report(progress.done, valid_out.rows, rejected_out.rows, counts)
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
