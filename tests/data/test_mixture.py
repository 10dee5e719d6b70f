"""Weighted mixtures of several datasets (`data.sources`): each source read in its own format,
validated with its own counts, split on its own, and drawn into the training rows by its weight,
the same rows for the same seed."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sft_pipeline.common.config import ConfigError, DataConfig, ValidationConfig, parse_section
from sft_pipeline.data.mixture import mix_stream
from sft_pipeline.data.splitting import split_stream
from sft_pipeline.data.validation import validate_stream
from tests.data.rows import ingest


def _write_sources(tmp_path, bad: int = 0):
    """Three sources in three formats: 60 chat records, 40 Alpaca records, 25 prompt/response
    pairs (the last `bad` of them with an empty response)."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Chat question {k}?"},
                        {"role": "assistant", "content": f"Chat answer {k}."},
                    ]
                }
            )
            + "\n"
            for k in range(60)
        )
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [{"instruction": f"Do {k}", "input": "", "output": f"Done {k}."} for k in range(40)]
        )
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"question": f"Pair {k}?", "reply": "" if k >= 25 - bad else f"P{k}."})
            + "\n"
            for k in range(25)
        )
    )
    return [
        {"name": "chat", "path": str(chat), "weight": 0.5},
        {"name": "alpaca", "path": str(alpaca), "schema": "alpaca", "weight": 0.3},
        {
            "name": "pairs",
            "path": str(pairs),
            "schema": "prompt_response",
            "columns": {"prompt": "question", "response": "reply"},
            "weight": 0.2,
        },
    ]


def _mixture(tmp_path, sources, **data):
    cfg = parse_section(DataConfig, {"sources": sources, **data}, "data")
    records = ingest(cfg)
    valid, _rejected, report = validate_stream(records, ValidationConfig(max_rejected_fraction=1.0))
    train, evaluation = split_stream(valid, cfg)
    mixed, counts = mix_stream(train, cfg)
    return mixed.to_pandas(), evaluation.to_pandas(), report, counts


def test_three_sources_weighted_half_three_tenths_one_fifth_give_those_shares(tmp_path):
    sources = _write_sources(tmp_path)
    mixed, evaluation, _report, counts = _mixture(tmp_path, sources, mixture_rows=10_000)
    assert len(mixed) == 10_000
    shares = Counter(mixed["source"])
    for name, weight in (("chat", 0.5), ("alpaca", 0.3), ("pairs", 0.2)):
        assert abs(shares[name] / 10_000 - weight) <= 0.02, shares
        assert counts[name]["rows"] == shares[name]
    # Upsampled evenly: each training record of a source appears a whole number of times,
    # give or take one.
    per_record = Counter(zip(mixed["source"], mixed["record_id"], strict=True))
    for name in ("chat", "alpaca", "pairs"):
        times = [n for (source, _), n in per_record.items() if source == name]
        assert len(times) == counts[name]["records"] and max(times) - min(times) <= 1
    # Eval records stay out of training, and every source keeps its own.
    assert not set(evaluation["record_id"]) & set(mixed["record_id"])
    assert set(evaluation["source"]) <= {"chat", "alpaca", "pairs"}


def test_the_same_seed_draws_the_same_rows_and_another_seed_others(tmp_path):
    sources = [dict(s, max_records=10) for s in _write_sources(tmp_path)]
    first = _mixture(tmp_path, sources, mixture_rows=500)[0]["record_id"].tolist()
    again = _mixture(tmp_path, sources, mixture_rows=500)[0]["record_id"].tolist()
    other = _mixture(tmp_path, sources, mixture_rows=500, seed=7)[0]["record_id"].tolist()
    assert first == again
    assert first != other


def test_per_source_counts_reconcile_in_the_validation_report(tmp_path):
    sources = _write_sources(tmp_path, bad=5)
    _mixed, _eval, report, _counts = _mixture(tmp_path, sources)
    records = ingest(parse_section(DataConfig, {"sources": sources}, "data"))
    _valid, rejected, _ = validate_stream(records, ValidationConfig(max_rejected_fraction=1.0))
    assert [row["source"] for row in rejected] == ["pairs"] * 5
    assert report["sources"] == {
        "chat": {"ingested": 60, "valid": 60, "rejected": 0},
        "alpaca": {"ingested": 40, "valid": 40, "rejected": 0},
        "pairs": {"ingested": 25, "valid": 20, "rejected": 5},
    }
    for key in ("ingested", "valid", "rejected"):
        assert sum(c[key] for c in report["sources"].values()) == report[key]


def test_max_records_caps_a_source_without_weights(tmp_path):
    sources = [{k: v for k, v in s.items() if k != "weight"} for s in _write_sources(tmp_path)]
    sources[0]["max_records"] = 7
    mixed, _eval, _report, counts = _mixture(tmp_path, sources)
    assert Counter(mixed["source"])["chat"] == 7 == counts["chat"]["rows"]
    assert Counter(mixed["source"])["alpaca"] == counts["alpaca"]["records"]
    assert mixed["record_id"].is_unique


def test_data_path_alone_is_one_unnamed_source(tmp_path):
    path = _write_sources(tmp_path)[0]["path"]
    records = ingest(DataConfig(path=path))
    assert set(records["source"]) == {""}
    _valid, _rejected, report = validate_stream(records, ValidationConfig())
    assert "sources" not in report


def test_weights_on_some_sources_only_are_refused_naming_them(tmp_path):
    sources = _write_sources(tmp_path)
    del sources[1]["weight"]
    with pytest.raises(ConfigError, match=r"sources \['alpaca'\] have no weight"):
        parse_section(DataConfig, {"sources": sources}, "data")


def test_each_source_s_files_are_deps_of_ingestion(tmp_path):
    from sft_pipeline.data.sources import local_data_files

    sources = _write_sources(tmp_path)
    cfg = parse_section(DataConfig, {"sources": sources}, "data")
    assert local_data_files(cfg, tmp_path) == [s["path"] for s in sources]


def test_rendered_rows_of_a_mixture_name_their_source_for_evaluation(tmp_path):
    from sft_pipeline.common.config import TemplateConfig
    from tests.conftest import build_tiny_tokenizer
    from tests.data.rows import render_records

    _mixed, evaluation, _report, _counts = _mixture(tmp_path, _write_sources(tmp_path))
    rows = render_records(
        evaluation, build_tiny_tokenizer(), TemplateConfig(chat_template="chatml")
    )
    assert [row["source"] for row in rows] == evaluation["source"].tolist()
    assert set(evaluation["source"]) == {"chat", "alpaca", "pairs"}
