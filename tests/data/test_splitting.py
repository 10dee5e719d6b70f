"""Splitting: deterministic by content id and seed; adding data never moves existing records."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from sft_pipeline.common.config import DataConfig
from sft_pipeline.data.records import RECORD_COLUMNS, content_id, dumps_messages, make_frame
from sft_pipeline.data.splitting import split_score
from tests.data.rows import split


def frame(n: int, start: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(start, start + n):
        messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        rows.append(
            {
                "record_id": content_id(messages, ""),
                "source_file": "d.jsonl",
                "source_row": i + 1,
                "format": "prompt_response",
                "messages": dumps_messages(messages),
                "text": "",
                "raw": "{}",
            }
        )
    return make_frame(rows)


def cfg(eval_fraction: float = 0.1, seed: int = 42) -> DataConfig:
    return DataConfig(eval_fraction=eval_fraction, seed=seed)


def test_split_is_deterministic_and_byte_identical() -> None:
    records = frame(200)
    outputs = []
    for _ in range(2):
        train, evaluation = split(records, cfg())
        buffer = io.BytesIO()
        pd.concat([train, evaluation]).to_parquet(buffer, index=False)
        outputs.append(buffer.getvalue())
    assert outputs[0] == outputs[1]


def test_every_record_lands_on_exactly_one_side_in_source_order() -> None:
    records = frame(300)
    train, evaluation = split(records, cfg(0.2))
    assert len(train) + len(evaluation) == 300
    assert set(train["record_id"]).isdisjoint(evaluation["record_id"])
    assert list(train["source_row"]) == sorted(train["source_row"])
    assert list(evaluation["source_row"]) == sorted(evaluation["source_row"])
    assert list(train.columns) == list(evaluation.columns) == RECORD_COLUMNS
    assert train.dtypes.equals(records.dtypes)


def test_adding_data_never_moves_existing_records() -> None:
    before_train, before_eval = split(frame(200), cfg(0.2))
    after_train, after_eval = split(frame(500), cfg(0.2))
    assert set(before_train["record_id"]) <= set(after_train["record_id"])
    assert set(before_eval["record_id"]) <= set(after_eval["record_id"])


def test_fraction_is_respected_roughly() -> None:
    _train, evaluation = split(frame(1000), cfg(0.1))
    assert 60 <= len(evaluation) <= 140


def test_seed_changes_the_assignment() -> None:
    records = frame(200)
    assert set(split(records, cfg(seed=1))[1]["record_id"]) != set(
        split(records, cfg(seed=2))[1]["record_id"]
    )


def test_split_score_is_in_unit_interval() -> None:
    scores = [split_score(f"{i:016x}", 0) for i in range(100)]
    assert all(0.0 <= s < 1.0 for s in scores)


@pytest.mark.parametrize("eval_fraction", [0.001, 0.999])
def test_two_records_give_one_each_side(eval_fraction: float) -> None:
    train, evaluation = split(frame(2), cfg(eval_fraction))
    assert len(train) == 1 and len(evaluation) == 1


def test_small_fraction_picks_the_lowest_score_for_eval() -> None:
    records = frame(5)
    _train, evaluation = split(records, cfg(1e-9))
    lowest = min(records["record_id"], key=lambda rid: split_score(rid, 42))
    assert list(evaluation["record_id"]) == [lowest]


def test_zero_fraction_and_single_record_have_empty_eval() -> None:
    train, evaluation = split(frame(10), cfg(0.0))
    assert len(train) == 10 and evaluation.empty
    train, evaluation = split(frame(1), cfg(0.5))
    assert len(train) + len(evaluation) == 1 and len(train) == 1


def test_empty_input_gives_empty_typed_frames() -> None:
    train, evaluation = split(frame(0), cfg())
    assert train.empty and evaluation.empty
    assert list(train.columns) == RECORD_COLUMNS
