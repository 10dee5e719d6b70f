"""Typed parameters: defaults match the YAML; typos and bad values fail with the key path."""

from pathlib import Path

import pytest
import yaml

from sft_pipeline.common.config import (
    ConfigError,
    DataConfig,
    SFTParameters,
    TrainingConfig,
    parse_section,
)

PARAMS = Path(__file__).resolve().parents[2] / "conf" / "base" / "parameters_sft.yml"


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


def test_a_misspelt_top_level_section_is_named_with_the_nearest_valid_one():
    from sft_pipeline.common.config import validate_parameters

    raw = yaml.safe_load(PARAMS.read_text())
    raw["trainig"] = raw.pop("training")
    with pytest.raises(ConfigError) as exc:
        validate_parameters(raw)
    msg = str(exc.value)
    assert "trainig" in msg and "did you mean `training`?" in msg


def test_a_misspelt_nested_key_is_named_with_its_section_and_nearest_key():
    from sft_pipeline.common.config import validate_parameters

    with pytest.raises(ConfigError) as exc:
        validate_parameters({"lora": {"alhpa": 8}})
    msg = str(exc.value)
    assert "lora.alhpa" in msg and "did you mean `alpha`?" in msg


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("data.seed", -1),
        ("data.seed", 2**32),
        ("data.eval_fraction", 1.0),
        ("validation.max_rejected_fraction", 1.5),
        ("validation.max_chars", 0),
        ("tokenization.max_seq_length", -512),
        ("tokenization.batch_size", 0),
        ("lora.r", 0),
        ("lora.alpha", -16),
        ("lora.dropout", 1.0),
        ("training.num_train_epochs", 0),
        ("training.max_steps", 0),
        ("training.max_steps", -2),
        ("training.per_device_train_batch_size", 0),
        ("training.per_device_eval_batch_size", 0),
        ("training.gradient_accumulation_steps", 0),
        ("training.learning_rate", 0),
        ("training.warmup_ratio", 1.0),
        ("training.weight_decay", -0.1),
        ("training.max_grad_norm", -1),
        ("training.pad_to_multiple_of", -8),
        ("training.logging_steps", 0),
        ("training.save_steps", 0),
        ("training.save_total_limit", 0),
        ("training.eval_steps", 0),
        ("training.seed", -1),
        ("training.seed", 2**32),
        ("training.num_processes", 0),
        ("training.dataloader_num_workers", -1),
        ("evaluation.max_samples", -1),
        ("evaluation.max_new_tokens", 0),
        ("evaluation.batch_size", 0),
    ],
)
def test_each_number_out_of_range_fails_with_its_key_path(path, value):
    from sft_pipeline.common.config import validate_parameters

    section, key = path.split(".")
    with pytest.raises(ConfigError) as exc:
        validate_parameters({section: {key: value}})
    assert f"  {path}: " in str(exc.value)


def test_the_edges_of_the_ranges_are_accepted():
    from sft_pipeline.common.config import validate_parameters

    params = validate_parameters(
        {
            "data": {"seed": 2**32 - 1},
            "training": {
                "seed": 0,
                "max_steps": -1,
                "pad_to_multiple_of": None,
                "save_total_limit": None,
                "eval_steps": None,
            },
        }
    )
    assert params.data.seed == 2**32 - 1 and params.training.save_total_limit is None


def test_rules_across_sections_are_checked_with_the_tree():
    from sft_pipeline.common.config import validate_parameters

    with pytest.raises(ConfigError, match=r"lora\.enabled: false"):
        validate_parameters({"lora": {"enabled": False}, "quantization": {"load_in_4bit": True}})
