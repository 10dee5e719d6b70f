"""Typed parameters: defaults match the YAML; typos and bad values fail with the key path."""

from pathlib import Path

import pytest
import yaml

from sft_pipeline.config import (
    ConfigError,
    DataConfig,
    SFTParameters,
    TrainingConfig,
    parse_section,
)

PARAMS = Path(__file__).resolve().parents[1] / "conf" / "base" / "parameters_sft.yml"


def test_shipped_parameters_parse_and_cover_every_section():
    raw = yaml.safe_load(PARAMS.read_text())
    params = SFTParameters.model_validate(raw)
    assert set(raw) == set(SFTParameters.model_fields)
    assert params.data.schema_ == "auto"
    assert params.model.name_or_path == "smollm2-135m-instruct"


def test_schema_alias_round_trips():
    assert parse_section(DataConfig, {"schema": "alpaca"}, "data").schema_ == "alpaca"


def test_typo_names_key_path_and_allowed_keys():
    with pytest.raises(ConfigError) as exc:
        parse_section(TrainingConfig, {"learning_rte": 1e-4}, "training")
    msg = str(exc.value)
    assert "training.learning_rte" in msg
    assert "learning_rate" in msg  # listed among the allowed keys


def test_bad_value_names_key_path_and_allowed_values():
    with pytest.raises(ConfigError) as exc:
        parse_section(TrainingConfig, {"optim": "sgd", "learning_rate": -1}, "training")
    msg = str(exc.value)
    assert "training.optim" in msg and "adamw_bnb_8bit" in msg
    assert "training.learning_rate" in msg


def test_empty_section_means_defaults():
    assert parse_section(TrainingConfig, None, "training") == TrainingConfig()
