"""The streamed data half: chunk sizes never change an artifact, counts reconcile, files as
people have them are read with nothing lost, Hub datasets resolve offline from the cache."""

from __future__ import annotations

import json
import logging
import time

import pandas as pd
import pytest

from sft_pipeline.artifact_io import ArrowDataset
from sft_pipeline.common.config import DataConfig, TokenizationConfig, ValidationConfig
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import readers, streams
from sft_pipeline.data.ingestion import ingest_to_parquet
from sft_pipeline.data.splitting import split_stream
from sft_pipeline.data.token_files import tokenize_stream
from sft_pipeline.data.tokenization import tokenize_texts
from sft_pipeline.data.validation import validate_stream
from tests.data.rows import ingest, split, validate

FIXTURE_FILES = [
    "llamafactory/alpaca_en_demo.json",
    "llamafactory/kto_en_demo.json",
    "llamafactory/glaive_toolcall_en_demo.json",
    "fastchat/data__dummy_conversation.json",
]


def records_bytes(path, chunk_rows: int) -> bytes:
    table = ingest_to_parquet(DataConfig(path=str(path), chunk_rows=chunk_rows))
    return table.path.read_bytes()


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_chunked_and_whole_file_ingestion_write_identical_bytes(fixtures_dir, name):
    path = fixtures_dir / "datasets" / name
    assert records_bytes(path, 7) == records_bytes(path, 10**6)


@pytest.mark.parametrize(("group_rows", "chunk_rows"), [(1, 1), (4, 3), (4096, 10_000)])
def test_streamed_validation_and_split_equal_the_in_memory_ones(
    tmp_path, monkeypatch, group_rows, chunk_rows
):
    monkeypatch.setattr(streams, "ROW_GROUP_ROWS", group_rows)  # duplicates across chunks
    rows = [{"prompt": f"q{i % 7}", "response": "a" if i % 5 else ""} for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(path=str(path), chunk_rows=chunk_rows)
    table = ingest_to_parquet(cfg)
    frame = ingest(cfg)
    pd.testing.assert_frame_equal(table.to_pandas(), frame, check_dtype=False)

    valid_t, rejected_t, report_t = validate_stream(table, ValidationConfig())
    valid_f, rejected_f, report_f = validate(frame, ValidationConfig())
    assert report_t == report_f
    assert list(rejected_t) == rejected_f
    assert report_t["ingested"] == report_t["valid"] + report_t["rejected"] == 30
    pd.testing.assert_frame_equal(valid_t.to_pandas(), valid_f, check_dtype=False)

    train_t, eval_t = split_stream(valid_t, cfg)
    train_f, eval_f = split(valid_f, cfg)
    assert list(train_t.to_pandas()["record_id"]) == list(train_f["record_id"])
    assert list(eval_t.to_pandas()["record_id"]) == list(eval_f["record_id"])
    assert len(train_t) + len(eval_t) == report_t["valid"]


def test_streamed_tokens_equal_in_memory_ones_as_int32(tiny_tokenizer, tmp_path):
    from tests.data.rows import render_messages

    rows = [
        {
            "record_id": str(i),
            **render_messages(_conv(f"q {i}", "Paris " * i), tiny_tokenizer, _t()),
        }
        for i in range(1, 12)
    ]
    cfg = TokenizationConfig(max_seq_length=24, batch_size=3)
    streamed, rejected_s = tokenize_stream(rows, tiny_tokenizer, cfg)
    in_memory, rejected_m = tokenize_texts(rows, tiny_tokenizer, cfg)
    assert rejected_s == rejected_m
    assert streamed.to_list() == in_memory.to_list()
    assert str(streamed.features["input_ids"].feature.dtype) == "int32"
    other, _ = tokenize_stream(rows, tiny_tokenizer, TokenizationConfig(max_seq_length=24))
    # The spooled save_to_disk folder is moved into place; another batch size, the same bytes.
    ArrowDataset(str(tmp_path / "a")).save(streamed)
    ArrowDataset(str(tmp_path / "b")).save(other)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    loaded = ArrowDataset(str(tmp_path / "a")).load()
    assert loaded.to_list() == in_memory.to_list()
    assert json.loads(loaded.info.description)["truncated_record_ids"] == ["9", "10", "11"]


def _conv(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _t():
    from sft_pipeline.common.config import TemplateConfig

    return TemplateConfig()


# --- files as people have them --------------------------------------------------------------


def test_raw_line_and_paragraph_separators_in_json_strings_are_kept(tmp_path):
    reply = "one\u2028two\u2029three\x85four"
    path = tmp_path / "d.jsonl"
    line = json.dumps({"prompt": "p", "response": reply}, ensure_ascii=False)
    path.write_text(line + "\n" + line.replace("p", "q", 1) + "\n", encoding="utf-8")
    records = ingest(DataConfig(path=str(path)))
    assert [json.loads(m)[1]["content"] for m in records["messages"]] == [reply, reply]
    assert list(records["source_row"]) == [1, 2]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_bom_crlf_and_blank_lines_lose_nothing(tmp_path, suffix):
    pairs = [{"prompt": "a b", "response": "c"}, {"prompt": "d", "response": "e\nf"}]
    if suffix == ".jsonl":
        body = "\r\n\r\n".join(json.dumps(p) for p in pairs) + "\r\n\r\n"
    elif suffix == ".json":
        body = json.dumps(pairs, indent=2).replace("\n", "\r\n") + "\r\n"
    else:
        body = 'prompt,response\r\n"a b",c\r\n\r\nd,"e\nf"\r\n'
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    records = ingest(DataConfig(path=str(path)))
    got = [json.loads(m) for m in records["messages"]]
    assert [[t["content"] for t in m] for m in got] == [["a b", "c"], ["d", "e\nf"]]


def test_deeply_nested_json_stops_naming_the_file(tmp_path):
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"deep{suffix}"
        deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "response": "x"}'
        path.write_text(deep + "\n" if suffix == ".jsonl" else f"[{deep}]", encoding="utf-8")
        started = time.monotonic()
        with pytest.raises(InputFileError, match=rf"deep\{suffix}.*nested too deeply"):
            ingest(DataConfig(path=str(path)))
        assert time.monotonic() - started < 10


def test_a_huge_line_stops_naming_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "huge.jsonl"
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p" * 5000, "response": "r"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(InputFileError, match=r"huge\.jsonl.*line 2.*longer than") as info:
        ingest(DataConfig(path=str(path)))
    assert info.value.line == 2
    (tmp_path / "huge.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(InputFileError, match=r"huge\.json.*longer than"):
        ingest(DataConfig(path=str(tmp_path / "huge.json")))


def test_symlink_loops_under_a_double_star_glob_read_each_file_once(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name, folder in (("a.jsonl", data), ("b.jsonl", data / "sub")):
        (folder / name).write_text(json.dumps({"prompt": name, "response": "r"}) + "\n")
    (data / "sub" / "loop").symlink_to(data, target_is_directory=True)
    (data / "again").symlink_to(data / "sub", target_is_directory=True)
    (data / "a-link.jsonl").symlink_to(data / "a.jsonl")
    started = time.monotonic()
    records = ingest(DataConfig(path=str(data / "**" / "*.jsonl")))
    assert time.monotonic() - started < 10
    prompts = sorted(json.loads(m)[0]["content"] for m in records["messages"])
    assert prompts == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize("pattern", ["data/*/**", "data/*/**/*.jsonl", "data/*/*/*.jsonl"])
def test_symlink_loops_under_any_glob_are_read_once_and_never_hang(tmp_path, monkeypatch, pattern):
    from sft_pipeline.data.sources import local_data_files

    # Two links to the parent: Python's glob walks 2^depth paths until the path is too long.
    data = tmp_path / "data"
    (data / "x").mkdir(parents=True)
    (data / "x" / "a.jsonl").write_text(json.dumps({"prompt": "a", "response": "r"}) + "\n")
    (data / "x" / "l1").symlink_to("..", target_is_directory=True)
    (data / "x" / "l2").symlink_to("..", target_is_directory=True)
    (data / "y" / "z").mkdir(parents=True)
    (data / "y" / "z" / "b.jsonl").write_text(json.dumps({"prompt": "b", "response": "r"}) + "\n")
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    records = ingest(DataConfig(path=pattern))
    prompts = sorted(json.loads(m)[0]["content"] for m in records["messages"])
    # `kedro dvc generate` expands data.path with the same resolver.
    deps = local_data_files(DataConfig(path=pattern), tmp_path)
    assert time.monotonic() - started < 10
    expected = {"data/*/**": ["a", "b"], "data/*/**/*.jsonl": ["a", "b"]}.get(pattern, ["b"])
    assert prompts == expected
    assert len(deps) == len(expected) and all(d.endswith(".jsonl") for d in deps)


def test_failed_detection_names_the_nearest_format_and_its_missing_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(InputFileError, match=r"looks like prompt_response, but column "):
        ingest(DataConfig(path=str(path)))
    with pytest.raises(InputFileError, match=r"`response\|completion` is missing"):
        ingest(DataConfig(path=str(path)))


# --- Hub datasets, offline from a prepared cache --------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub lays it out, with one dataset at one commit."""
    repo = tmp_path / "hf" / "hub" / "datasets--owner--alpaca"
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    rows = pd.DataFrame(
        {"instruction": ["Add 1 and 2.", "Say hi."], "input": ["", ""], "output": ["3", "hi"]}
    )
    rows.to_parquet(snapshot / "data" / "train-00000-of-00001.parquet", index=False)
    rows.head(1).to_parquet(snapshot / "data" / "test-00000-of-00001.parquet", index=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_hub_dataset_resolves_offline_and_records_repo_and_commit(hub_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.data.hub"):
        records = ingest(DataConfig(path="hf://datasets/owner/alpaca"))
    assert len(records) == 2
    expected = f"hf://datasets/owner/alpaca@{COMMIT}/data/train-00000-of-00001.parquet"
    assert set(records["source_file"]) == {expected}
    assert "not pinned" in caplog.text and f"@{COMMIT}" in caplog.text
    test = ingest(DataConfig(path="hf://datasets/owner/alpaca", split="test"))
    assert len(test) == 1


def test_pinned_hub_dataset_resolves_offline_without_warning(hub_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.data.hub"):
        records = ingest(DataConfig(path=f"hf://datasets/owner/alpaca@{COMMIT}"))
    assert len(records) == 2
    assert "not pinned" not in caplog.text


def test_hub_dataset_missing_from_the_cache_says_how_to_get_it(hub_cache):
    with pytest.raises(InputFileError, match=r"not in the local Hugging Face cache"):
        ingest(DataConfig(path="hf://datasets/owner/absent"))
    with pytest.raises(InputFileError, match=r"no files for split 'validation'"):
        ingest(DataConfig(path="hf://datasets/owner/alpaca", split="validation"))


@pytest.mark.parametrize("block", [7, 4096])
def test_json_lists_stream_item_by_item_across_block_boundaries(fixtures_dir, monkeypatch, block):
    monkeypatch.setattr(readers, "_BLOCK", block)
    path = fixtures_dir / "datasets" / "llamafactory" / "kto_en_demo.json"
    items = [row for _number, row in readers.read_json(path, path.name)]
    assert items == json.loads(path.read_text(encoding="utf-8"))


def test_rendering_in_worker_processes_writes_the_same_bytes(tiny_tokenizer, tmp_path, monkeypatch):
    from sft_pipeline.common.config import TemplateConfig
    from sft_pipeline.data import rendering

    monkeypatch.setattr(streams, "ROW_GROUP_ROWS", 3)
    rows = [{"prompt": f"q {i}", "response": f"Paris {i}"} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records = ingest_to_parquet(DataConfig(path=str(path)))
    monkeypatch.setenv("SFT_PIPELINE_RENDER_WORKERS", "0")
    serial = rendering.render_stream(records, tiny_tokenizer, TemplateConfig()).path.read_bytes()
    monkeypatch.setenv("SFT_PIPELINE_RENDER_WORKERS", "2")
    assert rendering._workers(7) == 2
    parallel = rendering.render_stream(records, tiny_tokenizer, TemplateConfig())
    assert parallel.path.read_bytes() == serial
    assert len(parallel) == 20
