"""Ingestion: every input format and file type maps to canonical records; bad files fail clearly."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, get_args

import pandas as pd
import pytest

from sft_pipeline.common.config import (
    COLUMN_KEYS,
    ConfigError,
    DataConfig,
    SchemaName,
    parse_section,
)
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import schemas
from sft_pipeline.data.records import RECORD_COLUMNS, content_id, detect_schema, to_canonical
from tests.data.rows import ingest


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(path: Any, **kwargs: Any) -> DataConfig:
    return DataConfig.model_validate(
        {"path": path if isinstance(path, list) else str(path), **kwargs}
    )


def messages(records: pd.DataFrame) -> list[list[dict[str, Any]]]:
    return [json.loads(m) for m in records["messages"]]


def conv(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


PAIRS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Capital of France?", "response": "Paris, of course."},
    {"prompt": 'Say hi, "quoted", with commas', "response": "hi\nthere"},
]


# --- formats -------------------------------------------------------------------------------


def test_prompt_response_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n", encoding="utf-8")
    records = ingest(cfg(path))
    assert list(records.columns) == RECORD_COLUMNS
    assert str(records["source_row"].dtype) == "int64"
    assert all(str(records[c].dtype) == "str" for c in RECORD_COLUMNS if c != "source_row")
    assert list(records["format"]) == ["prompt_response"] * 2
    # Line numbers, counting the blank line that was skipped.
    assert list(records["source_row"]) == [1, 3]
    assert messages(records) == [
        conv("What is 2+2?", "4"),
        conv("Capital of France?", "Paris, of course."),
    ]
    assert list(records["text"]) == ["", ""]
    assert records["record_id"][0] == content_id(conv("What is 2+2?", "4"), "")
    assert json.loads(records["raw"][1]) == PAIRS[1]


def test_completion_is_accepted_as_response(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    records = ingest(cfg(path))
    assert messages(records) == [conv("p", "c")]


def test_alpaca_input_and_system(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add.", "input": "", "output": "ok"},
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
        {"instruction": "Hi", "output": "Hello", "system": "Be brief."},
    ]
    records = ingest(cfg(write_jsonl(tmp_path / "a.jsonl", rows)))
    assert set(records["format"]) == {"alpaca"}
    got = messages(records)
    assert got[0] == conv("Add.", "ok")
    assert got[1] == conv("Add.\n\n1 and 2", "3")
    assert got[2] == [{"role": "system", "content": "Be brief."}, *conv("Hi", "Hello")]


def test_messages_format_ignores_extra_columns_but_keeps_them_in_raw(tmp_path: Path) -> None:
    row = {"messages": conv("u", "a"), "label": True}
    records = ingest(cfg(write_jsonl(tmp_path / "m.jsonl", [row])))
    assert records["format"][0] == "messages"
    assert messages(records) == [conv("u", "a")]
    assert json.loads(records["raw"][0]) == row


def test_sharegpt_roles_are_mapped_and_unknown_roles_kept(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "u"},
            {"from": "critic", "value": "{}"},
            {"from": "gpt", "value": "a"},
        ]
    }
    records = ingest(cfg(write_jsonl(tmp_path / "s.jsonl", [row])))
    assert records["format"][0] == "sharegpt"
    assert [m["role"] for m in messages(records)[0]] == [
        "system",
        "user",
        "critic",
        "assistant",
    ]


def test_text_format(tmp_path: Path) -> None:
    records = ingest(cfg(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])))
    assert records["format"][0] == "text"
    assert records["messages"][0] == "[]"
    assert records["text"][0] == "Once upon a time."


def test_system_column_is_prepended_to_conversations(tmp_path: Path) -> None:
    row = {"messages": conv("u", "a"), "system": "S"}
    records = ingest(cfg(write_jsonl(tmp_path / "m.jsonl", [row])))
    assert messages(records)[0][0] == {"role": "system", "content": "S"}


def test_column_renames(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "question", "a": "answer"}])
    records = ingest(cfg(path, columns={"prompt": "q", "response": "a"}))
    assert records["format"][0] == "prompt_response"
    assert messages(records) == [conv("question", "answer")]


def test_named_schema_with_renames_wins_over_detection(tmp_path: Path) -> None:
    row = {"instruction": "i", "input": "extra", "output": "o"}
    path = write_jsonl(tmp_path / "x.jsonl", [row])
    as_pairs = ingest(cfg(path, columns={"prompt": "instruction", "response": "output"}))
    assert as_pairs["format"][0] == "prompt_response"
    assert messages(as_pairs) == [conv("i", "o")]
    named = ingest(cfg(path, schema="alpaca"))
    assert messages(named) == [conv("i\n\nextra", "o")]


def test_gpteacher_style_response_column(tmp_path: Path) -> None:
    row = {"instruction": "Write code.", "input": "in C", "response": "int main() {}"}
    path = write_jsonl(tmp_path / "g.jsonl", [row])
    auto = ingest(cfg(path))
    mapped = ingest(cfg(path, columns={"response": "response"}))
    expected = [conv("Write code.\n\nin C", "int main() {}")]
    assert messages(auto) == messages(mapped) == expected
    assert auto["format"][0] == "alpaca"


def test_detect_schema() -> None:
    assert detect_schema(["messages", "label"]) == "messages"
    assert detect_schema(["conversations", "tools"]) == "sharegpt"
    assert detect_schema(["instruction", "input", "output"]) == "alpaca"
    assert detect_schema(["prompt", "response"]) == "prompt_response"
    assert detect_schema(["text"]) == "text"
    assert detect_schema(["q", "a"], {"prompt": "q", "response": "a"}) == "prompt_response"
    with pytest.raises(ValueError, match=r"columns \['a', 'b'\].*data\.columns"):
        detect_schema(["a", "b"])


def test_to_canonical_is_reusable_on_raw_rows() -> None:
    fmt, msgs, text = to_canonical(
        {"q": "x", "a": "y"}, "prompt_response", {"prompt": "q", "response": "a"}
    )
    assert (fmt, msgs, text) == ("prompt_response", conv("x", "y"), "")


def test_unknown_columns_key_is_a_config_error_before_any_file_is_read(tmp_path: Path) -> None:
    values = {"path": str(tmp_path / "never_read.jsonl"), "columns": {"promt": "prompt"}}
    with pytest.raises(ConfigError, match=r"data\.columns\.promt.*did you mean `prompt`"):
        parse_section(DataConfig, values, "data")


def test_the_parameter_check_allows_exactly_the_fields_of_the_input_formats() -> None:
    # The registry of formats is the source; the parameter check keeps a copy it can import.
    assert set(COLUMN_KEYS) == set(schemas.COLUMN_KEYS)
    assert set(get_args(SchemaName)) == {"auto", *schemas.FORMATS}
    for fmt in schemas.FORMATS.values():
        assert set(fmt.fields) <= set(COLUMN_KEYS), fmt.name


def test_record_level_problems_are_not_ingest_errors(tmp_path: Path) -> None:
    rows = [
        {"instruction": "a", "output": 42},
        {"instruction": "b", "output": None},
        {"instruction": "c", "output": "   "},
        {"instruction": "d"},
    ]
    records = ingest(cfg(write_jsonl(tmp_path / "bad.jsonl", rows)))
    assert len(records) == 4
    assert [m[1]["content"] for m in messages(records)] == [42, None, "   ", None]


# --- file types ----------------------------------------------------------------------------


def _write_all_types(tmp_path: Path) -> dict[str, Path]:
    import datasets

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", PAIRS)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(PAIRS, indent=2), encoding="utf-8")
    paths["csv"] = tmp_path / "d.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["prompt", "response"])
    writer.writeheader()
    writer.writerows(PAIRS)
    paths["csv"].write_text(buffer.getvalue(), encoding="utf-8")
    paths["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(PAIRS).to_parquet(paths["parquet"], index=False)
    paths["arrow"] = tmp_path / "arrow"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(paths["arrow"]))
    return paths


def test_every_file_type_gives_the_same_records(tmp_path: Path) -> None:
    expected = [conv(r["prompt"], r["response"]) for r in PAIRS]
    rows = {}
    for kind, path in _write_all_types(tmp_path).items():
        records = ingest(cfg(path))
        assert messages(records) == expected, kind
        assert list(records.columns) == RECORD_COLUMNS
        rows[kind] = list(records["source_row"])
        ids = list(records["record_id"])
        assert ids == [content_id(m, "") for m in expected]
    assert rows["jsonl"] == rows["json"] == rows["parquet"] == rows["arrow"] == [1, 2, 3]
    # CSV rows are file lines, and the header is line 1.
    assert rows["csv"] == [2, 3, 4]


def test_csv_rows_are_start_lines_of_multiline_records(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text('prompt,response\n"a\nb",x\nc,y\n', encoding="utf-8")
    records = ingest(cfg(path))
    assert list(records["source_row"]) == [2, 4]


def test_glob_and_list_of_paths_are_read_in_sorted_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [PAIRS[1]])
    write_jsonl(tmp_path / "a.jsonl", [PAIRS[0]])
    (tmp_path / "c.json").write_text(json.dumps([PAIRS[2]]), encoding="utf-8")
    records = ingest(cfg(str(tmp_path / "*.json*")))
    names = [Path(f).name for f in records["source_file"]]
    assert names == ["a.jsonl", "b.jsonl", "c.json"]
    listed = ingest(cfg([str(tmp_path / "c.json"), str(tmp_path / "a.jsonl")]))
    assert [Path(f).name for f in listed["source_file"]] == ["c.json", "a.jsonl"]


def test_source_file_is_relative_to_cwd_when_under_it(tmp_path: Path, monkeypatch) -> None:
    write_jsonl(tmp_path / "d.jsonl", PAIRS)
    monkeypatch.chdir(tmp_path)
    records = ingest(cfg(str(tmp_path / "d.jsonl")))
    assert set(records["source_file"]) == {"d.jsonl"}


def test_same_input_gives_byte_identical_parquet(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    first, second = io.BytesIO(), io.BytesIO()
    ingest(cfg(path)).to_parquet(first, index=False)
    ingest(cfg(path)).to_parquet(second, index=False)
    assert first.getvalue() == second.getvalue()


# --- file-level failures -------------------------------------------------------------------


def raises_input_error(config: DataConfig, *fragments: str) -> InputFileError:
    with pytest.raises(InputFileError) as info:
        ingest(config)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return info.value


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + '\n{"prompt": "x",\n')
    err = raises_input_error(cfg(path), "broken.jsonl", "line 3", "invalid JSON", "JSON Lines")
    assert err.line == 3


def test_json_list_in_jsonl_file_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(PAIRS, indent=2))
    raises_input_error(cfg(path), "line 1", "name it .json")


def test_invalid_json_document_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": }\n]\n')
    err = raises_input_error(cfg(path), "broken.json", "line 3", "column 14")
    assert (err.line, err.column) == (3, 14)


def test_non_utf8_bytes_name_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    first = (json.dumps(PAIRS[0]) + "\n").encode()
    path.write_bytes(first + '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    offset = len(first) + len('{"prompt": "caf')
    raises_input_error(cfg(path), "latin1.jsonl", "line 2", f"byte offset {offset}", "UTF-8")


@pytest.mark.parametrize("content", ["", "  \n\n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file(tmp_path: Path, content: str, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    raises_input_error(cfg(path), f"empty{suffix}", "is empty")


def test_empty_json_list_and_header_only_csv(tmp_path: Path) -> None:
    (tmp_path / "e.json").write_text("[]")
    raises_input_error(cfg(tmp_path / "e.json"), "e.json", "contains no records")
    (tmp_path / "h.csv").write_text("prompt,response\n")
    raises_input_error(cfg(tmp_path / "h.csv"), "h.csv", "contains no records")


def test_glob_matching_nothing(tmp_path: Path) -> None:
    raises_input_error(
        cfg(str(tmp_path / "nothing-*.jsonl")), "nothing-*.jsonl", "matches no files"
    )


def test_missing_path(tmp_path: Path) -> None:
    raises_input_error(cfg(str(tmp_path / "absent.jsonl")), "absent.jsonl", "no such file")


def test_missing_required_column_lists_found_and_expected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    raises_input_error(
        cfg(path, schema="prompt_response"),
        "d.jsonl",
        "missing required column(s) ['response']",
        "['prompt', 'answer']",
        "response|completion",
        "data.columns",
    )
    # A column named in data.columns that the file lacks is a typo, even for optional fields.
    raises_input_error(
        cfg(path, schema="prompt_response", columns={"response": "reply"}), "response: reply"
    )
    raises_input_error(
        cfg(path, columns={"prompt": "prompt", "response": "answer", "system": "sys"}),
        "system: sys",
    )


def test_undetectable_format_suggests_data_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    raises_input_error(
        cfg(path), "d.jsonl", "cannot detect", "['answer', 'question']", "data.columns"
    )


def test_json_that_is_not_a_list_of_objects(tmp_path: Path) -> None:
    (tmp_path / "obj.json").write_text(json.dumps({"data": PAIRS}))
    raises_input_error(cfg(tmp_path / "obj.json"), "obj.json", "JSON object", "list of objects")
    (tmp_path / "mixed.json").write_text(json.dumps([PAIRS[0], "oops"]))
    raises_input_error(cfg(tmp_path / "mixed.json"), "mixed.json", "item 2", "string")


def test_jsonl_row_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], [1, 2]])
    raises_input_error(cfg(path), "d.jsonl", "line 2", "JSON list", "one JSON object per line")


def test_csv_row_with_too_many_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\na,b\nc,d,e\n")
    raises_input_error(cfg(path), "d.csv", "line 3", "3 fields", "header has 2")


def test_unsupported_suffix_and_plain_folder(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("hello")
    raises_input_error(cfg(tmp_path / "d.txt"), "d.txt", "unsupported file type '.txt'")
    (tmp_path / "folder").mkdir()
    raises_input_error(cfg(tmp_path / "folder"), "folder", "not a datasets.save_to_disk folder")


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    raises_input_error(cfg(tmp_path / "bad.parquet"), "bad.parquet", "Parquet")


def test_unreadable_file(tmp_path: Path, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "locked.jsonl", PAIRS)

    real_open = os.open

    def deny(name, *args, **kwargs):
        # chmod 000 does not stop root (CI containers), so simulate the permission error.
        if str(name).endswith("locked.jsonl"):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    raises_input_error(cfg(path), "locked.jsonl", "cannot be read: Permission denied")


def test_dataset_dict_folder_asks_for_one_split(tmp_path: Path) -> None:
    import datasets

    split = datasets.Dataset.from_list(PAIRS)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    raises_input_error(cfg(tmp_path / "dd"), "DatasetDict", "['test', 'train']", "dd/test")
    assert len(ingest(cfg(tmp_path / "dd" / "train"))) == len(PAIRS)


def test_a_csv_field_over_128_kib_is_read_whole(tmp_path: Path) -> None:
    # The csv module's default field limit (128 KiB) stopped the whole file at one long answer.
    long_answer = "x" * (300 * 1024)
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["prompt", "response"], ["short", long_answer], ["a", "b"]])
    records = ingest(cfg(path))
    assert len(records) == 2
    assert messages(records)[0][1]["content"] == long_answer


def test_a_csv_record_over_the_record_limit_names_the_file_and_line(
    tmp_path: Path, monkeypatch
) -> None:
    from sft_pipeline.data import readers

    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 2**20)
    path = tmp_path / "big.csv"
    path.write_text("prompt,response\na,b\nc," + "y" * (2**20 + 10) + "\n", encoding="utf-8")
    raises_input_error(cfg(path), "big.csv", "line 3", "longer than 1 MiB")
