"""Validation: bad records are quarantined with every reason; counts reconcile; the gate stops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sft_pipeline.common.config import DataConfig, ValidationConfig
from sft_pipeline.common.errors import RejectedFractionError
from sft_pipeline.data.records import RECORD_COLUMNS
from sft_pipeline.data.validation import CANONICAL, RULES, check_rejected_fraction
from tests.data.rows import ingest, validate

GOOD = {"prompt": "What is 2+2?", "response": "4"}


def u(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def a(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def run(tmp_path: Path, rows: list[Any], **validation: Any):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records = ingest(DataConfig(path=str(path)))
    valid, rejected, report = validate(records, ValidationConfig(**validation))
    # Nothing is lost: every ingested record is valid or rejected, exactly once.
    assert report["ingested"] == len(records) == report["valid"] + report["rejected"]
    assert len(valid) == report["valid"] and len(rejected) == report["rejected"]
    kept = set(valid["source_row"]) | {r["source_row"] for r in rejected}
    assert kept == set(records["source_row"])
    return valid, rejected, report


def reasons_of(tmp_path: Path, row: Any, **validation: Any) -> list[str]:
    _valid, rejected, _report = run(tmp_path, [row], **validation)
    assert len(rejected) == 1
    return rejected[0]["reasons"]


def test_valid_records_pass_unchanged(tmp_path: Path) -> None:
    # The format is detected per file, so each format gets its own file.
    files = {
        "1.jsonl": GOOD,
        "2.jsonl": {
            "messages": [{"role": "system", "content": "s"}, u("hi"), a("hello"), u("x"), a("y")]
        },
        "3.jsonl": {"text": "plain text"},
    }
    for name, row in files.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n", encoding="utf-8")
    records = ingest(DataConfig(path=str(tmp_path / "*.jsonl")))
    valid, rejected, report = validate(records, ValidationConfig())
    assert rejected == []
    assert report == {
        "ingested": 3,
        "valid": 3,
        "rejected": 0,
        "rejected_fraction": 0.0,
        "reasons": {},
        "dropped_message_keys": {},
    }
    assert valid.equals(records)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "response": ""}, "empty_content: message 2 (assistant) is empty"),
        ({"prompt": "p", "response": " \n\t "}, "empty_content: message 2 (assistant) is empty"),
        ({"prompt": "  ", "response": "r"}, "empty_content: message 1 (user) is empty"),
        (
            {"instruction": "i", "output": 42},
            "content_not_string: message 2 (assistant): content is not a string (got int)",
        ),
        (
            {"instruction": "i", "output": None},
            "content_not_string: message 2 (assistant): content is not a string (got null)",
        ),
        (
            {"instruction": "i", "input": 7, "output": "o"},
            "content_not_string: message 1 (user): content is not a string (got object)",
        ),
        (
            {"messages": [u("q"), {"role": "critic", "content": "x"}, a("r")]},
            "unknown_role: message 2 has unknown role 'critic'",
        ),
        (
            {"messages": [u("q"), u("again"), a("r")]},
            "not_alternating: message 2 (user) where assistant was expected",
        ),
        (
            {"messages": [a("hello"), u("q"), a("r")]},
            "not_alternating: message 1 (assistant) where user was expected",
        ),
        (
            {"messages": [u("q"), a("r"), {"role": "system", "content": "s"}, u("q"), a("r")]},
            "not_alternating: message 3 is a system message",
        ),
        (
            {"messages": [u("q"), a("r"), u("more")]},
            "last_not_assistant: the last message (3, user)",
        ),
        ({"messages": [a("r")]}, "no_user_turn: the conversation has no user message"),
        ({"messages": [u("q")]}, "no_assistant_turn: the conversation has no assistant message"),
        ({"messages": "hello"}, "bad_messages: messages is not a list"),
        ({"messages": [u("q"), "oops", a("r")]}, "bad_turn: message 2 is not an object"),
        ({"text": "   "}, "empty_text: text is empty"),
        ({"text": 5}, "empty_text: text is empty"),
    ],
)
def test_each_problem_is_quarantined_with_its_reason(
    tmp_path: Path, row: dict[str, Any], expected: str
) -> None:
    reasons = reasons_of(tmp_path, row)
    assert any(r.startswith(expected) for r in reasons), reasons


def test_every_reason_is_reported(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "human", "value": ""},
            {"from": "critic", "value": 3},
            {"from": "human", "value": "again"},
        ]
    }
    reasons = reasons_of(tmp_path, row)
    codes = [r.split(":")[0] for r in reasons]
    assert codes == [
        "content_not_string",
        "empty_content",
        "unknown_role",
        "not_alternating",
        "no_assistant_turn",
        "last_not_assistant",
    ]


def test_rejected_row_carries_source_and_original_record(tmp_path: Path) -> None:
    bad = {"prompt": "i", "response": "", "extra": [1, 2]}
    _valid, rejected, report = run(tmp_path, [GOOD, bad])
    (row,) = rejected
    assert row["source_file"].endswith("data.jsonl")
    assert row["source_row"] == 2
    assert row["record"] == bad
    assert set(row) == {"record_id", "source_file", "source_row", "reasons", "record"}
    assert report["reasons"] == {"empty_content": 1}
    assert report["rejected_fraction"] == 0.5


def test_last_turn_rule_can_be_disabled(tmp_path: Path) -> None:
    row = {"messages": [u("q"), a("r"), u("more")]}
    valid, rejected, _ = run(tmp_path, [row], require_assistant_last=False)
    assert len(valid) == 1 and rejected == []


def test_length_budget(tmp_path: Path) -> None:
    reasons = reasons_of(tmp_path, {"prompt": "x" * 60, "response": "y" * 50}, max_chars=100)
    assert reasons == ["too_long: 110 characters, over validation.max_chars=100"]


def test_duplicates_keep_the_first_and_name_it(tmp_path: Path) -> None:
    valid, rejected, report = run(tmp_path, [GOOD, {"prompt": "other", "response": "r"}, GOOD])
    assert list(valid["source_row"]) == [1, 2]
    (dup,) = rejected
    assert dup["source_row"] == 3
    assert dup["reasons"][0].startswith("duplicate: same content as ")
    assert dup["reasons"][0].endswith("data.jsonl:1 (kept the first)")
    assert report["reasons"] == {"duplicate": 1}


def test_duplicates_allowed_when_configured(tmp_path: Path) -> None:
    valid, rejected, _ = run(tmp_path, [GOOD, GOOD], reject_duplicates=False)
    assert len(valid) == 2 and rejected == []


def test_all_rejected_gives_empty_typed_frame(tmp_path: Path) -> None:
    valid, _rejected, report = run(tmp_path, [{"prompt": "p", "response": ""}])
    assert valid.empty and list(valid.columns) == RECORD_COLUMNS
    assert report["valid"] == 0


def test_every_rule_has_a_unique_code_and_a_description() -> None:
    codes = [rule.code for rule in RULES]
    assert len(set(codes)) == len(codes) and "duplicate" not in codes
    assert all(rule.description for rule in RULES)


def test_pandera_checks_the_canonical_table_and_stops_on_a_malformed_artifact() -> None:
    assert {"record_id", "source_row", "format"} <= set(CANONICAL.columns)
    frame = pd.DataFrame({c: ["x"] for c in RECORD_COLUMNS})
    frame["record_id"] = 1  # an int where a string belongs: a broken artifact, not a bad record
    frame["source_row"] = 1
    frame["messages"] = "[]"
    frame["tools"] = ""
    frame["format"] = "text"
    with pytest.raises(ValueError, match="canonical schema"):
        validate(frame, ValidationConfig())
    with pytest.raises(ValueError, match="lack canonical columns"):
        validate(frame.drop(columns=["raw"]), ValidationConfig())


def report(ingested: int, rejected: int, reasons: dict[str, int]) -> dict[str, Any]:
    return {
        "ingested": ingested,
        "valid": ingested - rejected,
        "rejected": rejected,
        "rejected_fraction": rejected / ingested,
        "reasons": reasons,
    }


def test_rejected_fraction_gate() -> None:
    cfg = ValidationConfig(max_rejected_fraction=0.1)
    check_rejected_fraction(report(10, 1, {"empty_content": 1}), cfg, "rejects.jsonl")
    with pytest.raises(RejectedFractionError) as info:
        check_rejected_fraction(
            report(10, 4, {"unknown_role": 3, "duplicate": 1}), cfg, "data/08/rejects.jsonl"
        )
    message = str(info.value)
    for fragment in (
        "data/08/rejects.jsonl",
        "40.0%",
        "max_rejected_fraction=0.1",
        "unknown_role (3)",
    ):
        assert fragment in message


def test_gate_stops_when_nothing_is_left() -> None:
    with pytest.raises(RejectedFractionError, match="all 2 records were rejected"):
        check_rejected_fraction(
            report(2, 2, {"empty_content": 2}),
            ValidationConfig(max_rejected_fraction=1.0),
            "rejects.jsonl",
        )


# --- real third-party data -------------------------------------------------------------------

# (relative path, data.columns, ingested, minimum valid)
FIXTURE_DATASETS = [
    ("llamafactory/alpaca_en_demo.json", {}, 999, 980),
    ("llamafactory/identity.json", {}, 91, 91),
    ("llamafactory/kto_en_demo.json", {}, 300, 300),
    ("gpteacher/codegen-instruct.json", {}, 4535, 4500),
    (
        "gpteacher/roleplay-simple-deduped-roleplay-instruct.json",
        {"response": "response"},
        1923,
        1900,
    ),
    ("codealpaca/code_alpaca_2k.json", {}, 2017, 2000),
    ("fastchat/data__dummy_conversation.json", {}, 500, 500),
]


@pytest.mark.parametrize(("name", "columns", "ingested", "min_valid"), FIXTURE_DATASETS)
def test_fixture_datasets_ingest_and_validate(
    fixtures_dir: Path, name: str, columns: dict[str, str], ingested: int, min_valid: int
) -> None:
    records = ingest(DataConfig(path=str(fixtures_dir / "datasets" / name), columns=columns))
    valid, rejected, rep = validate(records, ValidationConfig())
    assert rep["ingested"] == len(records) == ingested
    assert rep["valid"] + rep["rejected"] == ingested
    assert len(valid) >= min_valid
    assert all(r["reasons"] for r in rejected)


def test_glaive_tool_turns_are_valid_and_only_exact_copies_are_rejected(fixtures_dir: Path) -> None:
    path = fixtures_dir / "datasets" / "llamafactory" / "glaive_toolcall_en_demo.json"
    records = ingest(DataConfig(path=str(path)))
    valid, rejected, rep = validate(records, ValidationConfig())
    assert rep["ingested"] == 300 == len(valid) + len(rejected)
    # The file holds 35 byte-identical copies of earlier records (tools included); nothing else
    # is rejected, and no tool turn is the reason.
    assert rep["reasons"] == {"duplicate": 35}
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(raw) - len({json.dumps(r, sort_keys=True) for r in raw}) == 35
    assert sum('"tool_calls"' in m for m in valid["messages"]) == 138
    # The original record (with its `tools` field) is kept for the report.
    assert all("tools" in row["record"] for row in rejected)


def test_validate_after_parquet_round_trip(tmp_path: Path) -> None:
    # Kedro hands validation the records read back from Parquet; dtypes must survive that.
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "p", "response": ""}) + "\n")
    ingest(DataConfig(path=str(path))).to_parquet(tmp_path / "records.parquet", index=False)
    records = pd.read_parquet(tmp_path / "records.parquet")
    _valid, rejected, report = validate(records, ValidationConfig())
    assert (report["valid"], report["rejected"]) == (1, 1)
    assert rejected[0]["source_row"] == 2
