"""Record-level validation: quarantine bad records with every reason, keep the rest.

One pass over each chunk: every record's view is built once (its messages parsed, its images
checked once) and every rule of `RULES` runs on it once, giving the reasons it fails
("empty_content: message 2 (assistant) is empty after stripping"); a record with any reason is
rejected with all of them. pandera checks what it is best at, the canonical table itself
(columns, types, formats): a table that fails it is a malformed artifact, a bug upstream of
validation, and stops the run instead of being quarantined. Duplicates are found by content id
across the whole stream, chunk boundaries included, by `SeenIds` alone.
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

from sft_pipeline.common.config import DataConfig, ValidationConfig
from sft_pipeline.common.errors import RejectedFractionError
from sft_pipeline.data import conversation_checks as conv
from sft_pipeline.data import image_checks, reasoning, tool_checks, value_checks
from sft_pipeline.data.conversation_checks import View
from sft_pipeline.data.records import RECORD_COLUMNS, SCHEMAS, loads_tools
from sft_pipeline.data.seen_ids import SeenIds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """One reason a record is rejected: its code (as reports count it), what it means, and the
    check giving one reason per problem found (none: the record passes the rule)."""

    code: str
    description: str
    check: Callable[[View, ValidationConfig], list[str]]


# Where the checks the table names live (each name in exactly one of them).
CHECK_MODULES = (conv, value_checks, reasoning, tool_checks)


def _rules(table: str) -> tuple[Rule, ...]:
    """The rules of a `code | description | check` table, each check found by its name."""
    rules = []
    for line in filter(None, map(str.strip, table.splitlines())):
        code, description, name = (cell.strip() for cell in line.split("|"))
        (check,) = [getattr(m, name) for m in CHECK_MODULES if hasattr(m, name)]
        rules.append(Rule(code, description, check))
    return tuple(rules)


# In the order a rejected record lists its reasons: code | what it means | check.
RULES = _rules(
    """
    bad_messages                | messages are not a list of objects       | bad_messages
    bad_turn                    | not an object with role and content      | bad_turn
    content_not_string          | content is neither text nor parts        | content_not_string
    unsupported_value           | bytes, or a non-text key                 | unsupported_values
    empty_content               | a message without text, calls or images  | empty_content
    unclosed_reasoning          | a reasoning tag never closed             | unclosed_tag
    reasoning_outside_assistant | reasoning on a non-assistant turn        | outside_assistant
    empty_answer                | reasoning with no answer after it        | empty_answer
    bad_turn_control            | train/weight that are not usable         | bad_control
    no_trained_turn             | every assistant turn context only        | no_trained_turn
    unknown_role                | not system, user, assistant or tool      | unknown_role
    not_alternating             | turns out of order                       | not_alternating
    bad_tools                   | tools that are not named functions       | bad_tools
    malformed_tool_call         | a call without name or object            | malformed_tool_call
    undeclared_function         | a call of an undeclared tool             | undeclared_function
    orphan_tool_result          | a result of no call before it            | orphan_tool_result
    no_user_turn                | no user message                          | no_user_turn
    no_assistant_turn           | no assistant message                     | no_assistant_turn
    last_not_assistant          | the assistant does not speak last        | last_not_assistant
    empty_text                  | a text record without text               | empty_text
    too_long                    | over validation.max_chars characters     | too_long
    image_count                 | placeholders and images differ in number | image_count
    image_missing               | an image file that does not exist        | image_missing
    image_unreadable            | an image unreadable or over a size limit | image_unreadable
    image_in_assistant_turn     | an assistant's image                     | image_not_in_user_turn
    """
)
DUPLICATE = "duplicate"  # the same content as an earlier record (validation.reject_duplicates)

# The canonical table's columns and types, as ingestion writes them (the other columns are read
# as JSON by the view, which fails on anything else).
CANONICAL = pa.DataFrameSchema(
    {
        "record_id": pa.Column(str, nullable=False),
        "source_file": pa.Column(str, nullable=False),
        "source_row": pa.Column(int, pa.Check.ge(1), nullable=False),
        "format": pa.Column(str, pa.Check.isin(SCHEMAS), nullable=False),
        "text": pa.Column(str, nullable=False),
    }
)


def _canonical(records: pd.DataFrame) -> pd.DataFrame:
    """The chunk's canonical columns in order, checked by pandera; a malformed table stops."""
    if "source" not in records.columns:  # records made before mixtures: one unnamed source
        records = records.assign(source="")
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack canonical columns {missing}; got {list(records.columns)}")
    records = records[RECORD_COLUMNS].reset_index(drop=True)
    try:
        CANONICAL.validate(records, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise ValueError(
            "records do not match the canonical schema:\n" + exc.failure_cases.to_string()
        ) from None
    return records


def _view(
    fmt: str,
    messages: str,
    text: str,
    tools: str,
    cfg: ValidationConfig,
    reasoning_tags: tuple[str, str] = DataConfig().reasoning_tags,
) -> View:
    turns = json.loads(messages)
    return {
        "reasoning_tags": reasoning_tags,
        "format": fmt,
        "turns": turns,
        "text": text,
        "tools": loads_tools(tools),
        "image_problems": image_checks.problems(turns, cfg),
    }


def reasons(view: View, cfg: ValidationConfig) -> list[str]:
    """Every reason a record fails the rules, `code: what is wrong`, in `RULES` order."""
    return [f"{rule.code}: {text}" for rule in RULES for text in rule.check(view, cfg)]


def _validate_chunk(
    records: pd.DataFrame, cfg: ValidationConfig, seen: SeenIds, tags: tuple[str, str]
) -> tuple[pd.DataFrame, list[dict[str, Any]], Counter[str]]:
    """One chunk: (valid records, rejected rows with every reason, reason counts)."""
    records = _canonical(records)
    earlier: list[tuple[str, int] | None] = [None] * len(records)
    if cfg.reject_duplicates:
        keys = np.fromiter((seen.key(r) for r in records["record_id"]), np.uint64, len(records))
        earlier = seen.first_and_add(
            keys, records["source_file"].tolist(), records["source_row"].to_numpy(np.int64)
        )
    rejected: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    kept = np.ones(len(records), dtype=bool)
    columns = zip(
        records["format"], records["messages"], records["text"], records["tools"], strict=True
    )
    for position, (fmt, messages, text, tools) in enumerate(columns):
        found = reasons(_view(fmt, messages, text, tools, cfg, tags), cfg)
        where = earlier[position]
        if where is not None:
            found.append(f"{DUPLICATE}: same content as {where[0]}:{where[1]} (kept the first)")
        if not found:
            continue
        kept[position] = False
        counts.update({reason.split(":", 1)[0] for reason in found})
        rejected.append(
            {
                "record_id": records.at[position, "record_id"],
                "source_file": records.at[position, "source_file"],
                "source_row": int(records.at[position, "source_row"]),
                "reasons": found,
                "record": json.loads(records.at[position, "raw"]),
                # The `data.sources` entry, for a mixture's rejects (none for `data.path`).
                **({"source": name} if (name := records.at[position, "source"]) else {}),
            }
        )
    return records[kept].reset_index(drop=True), rejected, counts


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


def validate_stream(
    records, cfg: ValidationConfig, reasoning_tags: tuple[str, str] = DataConfig().reasoning_tags
):
    """Validate canonical records chunk by chunk over a `RecordTable` (or DataFrame), the same
    rules on each chunk: valid records and rejects stream into spool files, so memory stays
    flat.

    Returns (valid `RecordTable`, rejected `JSONLines`, counts report)."""
    from sft_pipeline.data.streams import JSONLinesSpool, ParquetSpool, Progress, iter_record_frames

    seen = SeenIds()
    valid_out, rejected_out = ParquetSpool("valid_records"), JSONLinesSpool("rejected_records")
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()  # per-message keys ingestion left out, by messages
    progress = Progress("validate_records", len(records))
    per_source: dict[str, Counter[str]] = {}
    for chunk in iter_record_frames(records):
        valid, rejected, chunk_counts = _validate_chunk(chunk, cfg, seen, tuple(reasoning_tags))
        _count_sources(per_source, chunk, valid)
        valid_out.write(valid)
        rejected_out.write(rejected)
        counts.update(chunk_counts)
        value_checks.count_dropped(chunk["dropped_keys"], dropped)
        progress.update(len(chunk))
    progress.finish()
    report = _report(progress.done, valid_out.rows, rejected_out.rows, counts)
    report["dropped_message_keys"] = dict(sorted(dropped.items()))
    if set(per_source) - {""}:
        # Per `data.sources` entry; they add up to the totals above.
        report["sources"] = {
            name: {"ingested": c["ingested"], "valid": c["valid"], "rejected": c["rejected"]}
            for name, c in per_source.items()
        }
    if dropped:
        log.warning(
            "per-message keys no chat template reads were left out of the messages (messages "
            "per key): %s",
            report["dropped_message_keys"],
        )
    return valid_out.close(), rejected_out.close(), report


def _count_sources(per_source: dict[str, Counter[str]], chunk, valid) -> None:
    """Add a chunk's records per source (ingested, valid, rejected) to `per_source`."""
    names = chunk["source"] if "source" in chunk.columns else [""] * len(chunk)
    ingested, kept = Counter(names), Counter(valid["source"])
    for name, n in ingested.items():
        counts = per_source.setdefault(name, Counter())
        counts.update({"ingested": n, "valid": kept[name], "rejected": n - kept[name]})


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
