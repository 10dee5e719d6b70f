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


def test_a_misspelt_data_columns_key_is_named_with_the_nearest_field():
    from sft_pipeline.common.config import validate_parameters

    with pytest.raises(ConfigError) as exc:
        validate_parameters({"data": {"columns": {"respnse": "answer", "prompt": "question"}}})
    msg = str(exc.value)
    assert "data.columns.respnse" in msg and "did you mean `response`?" in msg
    assert "prompt" not in msg.split("did you mean")[1]  # only the bad key is reported
    assert validate_parameters({"data": {"columns": {"response": "answer"}}}).data.columns == {
        "response": "answer"
    }


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


# --------------------------------------------------------------------------- gates


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        (TrainingConfig, {"learning_rate": float("inf")}, "training.learning_rate"),
        (TrainingConfig, {"learning_rate": float("nan")}, "training.learning_rate"),
        (TrainingConfig, {"max_grad_norm": float("inf")}, "training.max_grad_norm"),
        (TrainingConfig, {"num_train_epochs": float("nan")}, "training.num_train_epochs"),
        (DataConfig, {"eval_fraction": float("nan")}, "data.eval_fraction"),
    ],
)
def test_a_non_finite_number_is_refused_with_its_key(section, values, key):
    with pytest.raises(ConfigError) as exc:
        parse_section(section, values, key.split(".")[0])
    assert key in str(exc.value) and "finite" in str(exc.value)


@pytest.mark.parametrize(
    ("values", "key", "bound"),
    [
        ({"learning_rate": 1e30}, "training.learning_rate", "less than or equal to 1"),
        ({"weight_decay": 5.0}, "training.weight_decay", "less than or equal to 1"),
        ({"num_train_epochs": 1e9}, "training.num_train_epochs", "10000"),
        ({"max_steps": 1e30}, "training.max_steps", "maximum"),
        ({"save_steps": 2**40}, "training.save_steps", str(2**31 - 1)),
    ],
)
def test_a_number_past_its_documented_bound_is_refused_with_its_key(values, key, bound):
    with pytest.raises(ConfigError) as exc:
        parse_section(TrainingConfig, values, "training")
    assert key in str(exc.value) and bound in str(exc.value)


def test_the_yaml_inf_and_1e30_learning_rates_fail_the_whole_tree_check():
    from sft_pipeline.common.config import validate_parameters

    for text in ("learning_rate: .inf", "learning_rate: 1.0e+30", "learning_rate: .nan"):
        raw = yaml.safe_load(PARAMS.read_text())
        raw["training"].update(yaml.safe_load(text))
        with pytest.raises(ConfigError, match=r"training\.learning_rate"):
            validate_parameters(raw)


@pytest.mark.parametrize(
    ("values", "key", "nearest"),
    [
        ({"lr_scheduler_type": "cosnie"}, "training.lr_scheduler_type", "cosine"),
        ({"optim": "adamw_torh"}, "training.optim", "adamw_torch"),
        ({"precision": "bf61"}, "training.precision", "bf16"),
        ({"resume": "atuo"}, "training.resume", "auto"),
        ({"report_to": "tensorbord"}, "training.report_to", "tensorboard"),
        ({"report_to": ["wandb", "mlfow"]}, "training.report_to.1", "mlflow"),
    ],
)
def test_an_enumerated_parameter_names_the_nearest_valid_value(values, key, nearest):
    with pytest.raises(ConfigError) as exc:
        parse_section(TrainingConfig, values, "training")
    msg = str(exc.value)
    assert f"{key}:" in msg and f"did you mean `{nearest}`?" in msg
    assert "literal[" not in msg  # union member tags are not part of a key path


@pytest.mark.parametrize(
    ("section", "values", "key", "nearest"),
    [
        ("model", {"torch_dtype": "bfloat61"}, "model.torch_dtype", "bfloat16"),
        ("model", {"attn_implementation": "spda"}, "model.attn_implementation", "sdpa"),
        ("data", {"schema": "alpacca"}, "data.schema", "alpaca"),
        ("quantization", {"bnb_4bit_quant_type": "fn4"}, "quantization.bnb_4bit_quant_type", "nf4"),
        (
            "tokenization",
            {"special_tokens_in_content": "literall"},
            "tokenization.special_tokens_in_content",
            "literal",
        ),
        ("export", {"gguf": ["q8"]}, "export.gguf.0", "q8_0"),
    ],
)
def test_every_section_names_the_nearest_valid_value(section, values, key, nearest):
    from sft_pipeline.common.config import validate_parameters

    with pytest.raises(ConfigError) as exc:
        validate_parameters({section: values})
    msg = str(exc.value)
    assert f"{key}:" in msg and f"did you mean `{nearest}`?" in msg


def test_enumerations_equal_the_transformers_enums_they_mirror():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.trainer_utils import SchedulerType

    from sft_pipeline.common.config import LR_SCHEDULER_TYPES, REPORT_TO

    assert set(LR_SCHEDULER_TYPES) == {s.value for s in SchedulerType}
    assert set(REPORT_TO) == {"none", *INTEGRATION_TO_CALLBACK}


def test_template_date_is_a_fixed_day_by_default_and_parses_from_yaml_text():
    import datetime

    from sft_pipeline.common.config import TemplateConfig

    assert TemplateConfig().date == datetime.date(2024, 7, 26)
    raw = yaml.safe_load(PARAMS.read_text())
    assert parse_section(TemplateConfig, raw["template"], "template").date == TemplateConfig().date
    cfg = parse_section(TemplateConfig, {"date": "2025-01-02"}, "template")
    assert cfg.date == datetime.date(2025, 1, 2)
    with pytest.raises(ConfigError, match=r"template\.date"):
        parse_section(TemplateConfig, {"date": "yesterday"}, "template")
