"""Typed configuration: one pydantic model per top-level key of `parameters_sft.yml`.

Each node parses the parameter sections it reads once, at its start, so a typo or a bad value
fails with the key path and the allowed values before any expensive work. Rules that involve
more than one section (`training_method`) live here too.
"""

from __future__ import annotations

import datetime
import difflib
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator

# The data section lives in its own module; its names are found here like every section's.
from sft_pipeline.common.data_params import COLUMN_KEYS as COLUMN_KEYS
from sft_pipeline.common.data_params import ColumnKey as ColumnKey
from sft_pipeline.common.data_params import DataConfig as DataConfig
from sft_pipeline.common.data_params import SchemaName as SchemaName
from sft_pipeline.common.data_params import SourceConfig as SourceConfig
from sft_pipeline.common.errors import UserError
from sft_pipeline.common.param_base import COUNT_MAX, SEED_MAX, _Section

# Bounds of numbers (README, Configuration, lists them): SEED_MAX, COUNT_MAX in param_base.
# Tokens per row and per batch: far above any model's context, far below what overflows.
LENGTH_MAX = 2**20
# Adam-family learning rates live around 1e-6..1e-2; one above 1 is a typo (or a missing minus
# sign in the exponent), and diverges at the first step.
LEARNING_RATE_MAX = 1.0
EPOCHS_MAX = 10_000.0
# transformers' SchedulerType values (a test keeps this list equal to the enum, so the data half
# does not import transformers to check a parameter).
LR_SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
LRSchedulerType = Literal[LR_SCHEDULER_TYPES]  # type: ignore[valid-type]
# transformers' reporting integrations (`INTEGRATION_TO_CALLBACK`, kept equal by a test), plus
# "none"; dvclive is ours (sft_pipeline.finetune.tracking).
REPORT_TO = (
    "none",
    "azure_ml",
    "clearml",
    "codecarbon",
    "comet_ml",
    "dagshub",
    "dvclive",
    "flyte",
    "kubeflow",
    "mlflow",
    "neptune",
    "swanlab",
    "tensorboard",
    "trackio",
    "wandb",
)
ReportTo = Literal[REPORT_TO]  # type: ignore[valid-type]
# Roles `training.roles_to_train` may name (the roles of canonical turns that have content).
TRAINABLE_ROLES = ("assistant", "user", "system")
TrainableRole = Literal[TRAINABLE_ROLES]  # type: ignore[valid-type]
# The fixed date chat templates see (`template.date`): Llama 3.1's own default `date_string`.
DEFAULT_TEMPLATE_DATE = datetime.date(2024, 7, 26)


def as_list(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """A parameter that takes one string or a list of them (`data.path`, `training.report_to`),
    as a list."""
    return [value] if isinstance(value, str) else list(value)


class ConfigError(UserError, ValueError):
    """A parameter section failed validation; the message names every bad key path."""


class ValidationConfig(_Section):
    max_rejected_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_chars: int = Field(32_000, gt=0, le=COUNT_MAX)
    require_assistant_last: bool = True
    reject_duplicates: bool = True
    # Images: larger ones are rejected (decoding them costs memory long before training does).
    max_image_pixels: int = Field(40_000_000, gt=0, le=COUNT_MAX)
    max_image_bytes: int = Field(50 * 2**20, gt=0, le=COUNT_MAX)


class ModelConfig(_Section):
    name_or_path: str = "smollm2-135m-instruct"
    revision: str | None = None
    trust_remote_code: bool = False
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None


class TemplateConfig(_Section):
    # "auto": the tokenizer's own chat template, or the built-in "plain" layout when it has none
    # (base models: prompt, then reply + EOS); "tokenizer" requires the tokenizer's own; else
    # chatml, hermes (tools), alpaca, plain or a .jinja path.
    chat_template: str = "auto"
    system_prompt: str | None = None
    # The day templates that print a date see: passed as `date_string` (Llama 3.x) and returned
    # by `strftime_now` while rendering, so the rendered texts never depend on the day they were
    # made (a YAML date, 2024-07-26).
    date: datetime.date = DEFAULT_TEMPLATE_DATE
    # Rows per conversation: one, or one per trained turn as prompted (data/turn_rows.py).
    multi_turn: Literal["auto", "whole", "per_turn", "last"] = "auto"
    # Passed to the template as `enable_thinking` (Qwen3, SmolLM3); None: its own default.
    enable_thinking: bool | None = None


class TokenizationConfig(_Section):
    max_seq_length: int = Field(512, gt=1, le=COUNT_MAX)
    batch_size: int = Field(256, gt=0, le=LENGTH_MAX)
    # Text inside a record that spells a control token (`<|im_end|>`): `literal` tokenizes it as
    # ordinary text, so only the chat template writes control tokens; `reject` quarantines the
    # record, naming the token; `parse` reads it as the control token (forged turns possible).
    special_tokens_in_content: Literal["literal", "reject", "parse"] = "literal"


class QuantizationConfig(_Section):
    # auto: a 4-bit NF4 base (QLoRA) where bitsandbytes has fast 4-bit kernels (CUDA). On a CPU
    # its 4-bit matmuls run several times slower than fp32 ones (measured: see README), so auto
    # loads the base in full precision there; `true` forces 4-bit anywhere (to save memory).
    load_in_4bit: bool | Literal["auto"] = "auto"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class LoraConfig(_Section):
    enabled: bool = True
    r: int = Field(16, gt=0, le=LENGTH_MAX)
    alpha: int = Field(32, gt=0, le=LENGTH_MAX)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False


class TrainingConfig(_Section):
    output_dir: str = "data/06_models/checkpoints"
    num_train_epochs: float = Field(1.0, gt=0, le=EPOCHS_MAX)
    # -1: train num_train_epochs; otherwise this many optimizer steps.
    max_steps: int = Field(-1, ge=-1, le=COUNT_MAX)
    per_device_train_batch_size: int = Field(8, gt=0, le=LENGTH_MAX)
    per_device_eval_batch_size: int = Field(8, gt=0, le=LENGTH_MAX)
    gradient_accumulation_steps: int = Field(1, gt=0, le=LENGTH_MAX)
    learning_rate: float = Field(2e-4, gt=0, le=LEARNING_RATE_MAX)
    lr_scheduler_type: LRSchedulerType = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    # AdamW's decoupled decay (times the learning rate); above 1 it erases the weights.
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    # 0: no clipping.
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6)
    optim: Literal["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor"] = "adamw_torch"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    packing: bool = True
    # Without packing: each batch's rows re-packed into rows of at most max_length tokens
    # (same rows and loss per step, no compute on padding).
    padding_free: bool = False
    pad_to_multiple_of: int | None = Field(8, gt=0, le=LENGTH_MAX)
    logging_steps: int = Field(1, gt=0, le=COUNT_MAX)
    save_steps: int = Field(50, gt=0, le=COUNT_MAX)
    # null: keep every checkpoint.
    save_total_limit: int | None = Field(2, gt=0, le=COUNT_MAX)
    eval_steps: int | None = Field(None, gt=0, le=COUNT_MAX)
    resume: Literal["auto", "never"] = "auto"
    report_to: ReportTo | list[ReportTo] = "none"
    # DVCLive's folder (report_to: dvclive): per-step metrics and plots that DVC reads.
    live_dir: str = "data/08_reporting/dvclive"
    seed: int = Field(42, ge=0, le=SEED_MAX)
    num_processes: int = Field(1, gt=0, le=2**16)
    # An accelerate config file (FSDP2, DeepSpeed ZeRO, several machines) for num_processes > 1;
    # null: plain DDP on this machine.
    accelerate_config: str | None = None
    dataloader_num_workers: int = Field(0, ge=0, le=1024)
    # Vision-language models: the language model trains; these add the vision tower and the
    # projector (LoRA adapters on their linear layers, or their weights in a full fine-tune).
    train_vision_tower: bool = False
    train_projector: bool = False
    # Roles whose turns are supervised: the content (and closing control token) of a user or
    # system turn trains with the assistant turn it leads to (data/turn_rows.py); read by
    # render_conversations, which decides what is supervised.
    roles_to_train: list[TrainableRole] = Field(default_factory=lambda: ["assistant"])

    @field_validator("roles_to_train")
    @classmethod
    def _assistant_trains(cls, value: list[str]) -> list[str]:
        if "assistant" not in value:
            raise ValueError(
                f"{value} leaves the assistant turns untrained; rows are built around them, so "
                f"expected a list with 'assistant' and any of {list(TRAINABLE_ROLES)}"
            )
        return value

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 trains nothing; expected -1 (train num_train_epochs) or >= 1")
        return value


Method = Literal["qlora", "lora", "full"]


def training_method(quant: QuantizationConfig, lora: LoraConfig) -> Method:
    """Which of the three methods the two switches select (`load_in_4bit` already decided).

    - `quantization.load_in_4bit: true`  + `lora.enabled: true`  -> QLoRA (the default on CUDA);
    - `quantization.load_in_4bit: false` + `lora.enabled: true`  -> LoRA on a full-precision base;
    - `quantization.load_in_4bit: false` + `lora.enabled: false` -> full fine-tuning;
    - `quantization.load_in_4bit: true`  + `lora.enabled: false` -> error: 4-bit weights are
      frozen integer codes, there is nothing for a full fine-tune to update.
    """
    if lora.enabled:
        return "qlora" if quant.load_in_4bit is True else "lora"
    if quant.load_in_4bit is True:
        raise ConfigError(
            "invalid parameters: `lora.enabled: false` asks for full fine-tuning, but "
            "`quantization.load_in_4bit: true` loads the base as frozen 4-bit weights, which "
            "cannot be fine-tuned directly.\n"
            "  Expected one of: lora.enabled: true (QLoRA), or quantization.load_in_4bit: false "
            "(with lora.enabled: true for LoRA on a full-precision base, false for full "
            "fine-tuning)."
        )
    return "full"


class MergeConfig(_Section):
    # Full-precision weights (hub id, folder or .gguf) to merge the adapter into instead of the
    # base's own: for a pre-quantized 4-bit base, its original. null: the base's own weights
    # (dequantized when they exist only in 4-bit).
    base_model: str | None = None


class BenchmarksConfig(_Section):
    # lm-evaluation-harness task names: the local task YAMLs in `task_dir` first, then lm-eval's
    # own tasks (their data read from the local datasets cache). Empty: no benchmark.
    tasks: list[str] = Field(default_factory=list)
    task_dir: str = Field("conf/base/benchmarks", min_length=1)
    # Items per task (the first ones, lm-eval's `limit`); null: all of them.
    limit: int | None = Field(None, gt=0, le=COUNT_MAX)
    # Few-shot examples per item; null: each task's own setting (0 where it has none).
    num_fewshot: int | None = Field(None, ge=0, le=COUNT_MAX)
    # Requests per forward pass; "auto": lm-eval finds the largest that fits (GPU memory; on a
    # CPU it runs batches as long as the model's context to find out, which takes minutes).
    batch_size: int | Literal["auto"] = Field(16)

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 < value <= LENGTH_MAX:
            raise ValueError(f"a batch size in 1..{LENGTH_MAX} or 'auto', got {value}")
        return value

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or not all(value):
            raise ValueError(f"each task once, by a non-empty name, got {value}")
        return value


class EvaluationConfig(_Section):
    max_samples: int = Field(50, ge=0, le=COUNT_MAX)
    max_new_tokens: int = Field(64, gt=0, le=LENGTH_MAX)
    batch_size: int = Field(8, gt=0, le=LENGTH_MAX)
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig)
    # Fail the run when a benchmark score of the tuned model is worse than the base's by more
    # than this (in the metric's own units) and by more than two standard errors; null: never.
    max_regression: float | None = Field(None, ge=0)


GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q5_0", "q4_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
# llama.cpp's own spellings; any letter case is accepted and normalized to them.
_GGUF_SPELLING = {t.lower(): t for t in GGUFType.__args__}


class ExportConfig(_Section):
    # GGUF files to write for llama.cpp and Ollama; empty writes none (the export is optional and
    # a q8_0 of a 7B takes minutes and 7 GB).
    gguf: list[GGUFType] = Field(default_factory=list)
    # Read each written file back and measure its teacher-forced next-token agreement with the
    # merged model (llama.cpp itself where its client is installed); a file below its type's
    # threshold fails the run. Costs one load of the merged model and of each file.
    check: bool = True

    @field_validator("gguf", mode="before")
    @classmethod
    def _spelling(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [_GGUF_SPELLING.get(v.lower(), v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("gguf")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each GGUF type once, got {value}")
        return value


class SFTParameters(_Section):
    """All of `parameters_sft.yml`; nodes usually parse only their own sections."""

    data: DataConfig = Field(default_factory=DataConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    tokenization: TokenizationConfig = Field(default_factory=TokenizationConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any) -> Any:
        # An empty YAML section (`lora:`) parses as None; treat it as "all defaults".
        return {} if value is None else value


_S = TypeVar("_S", bound=BaseModel)


def parse_section(model: type[_S], values: dict[str, Any] | None, key: str) -> _S:
    """Parse one parameter section, re-raising pydantic's errors with `key.path` and hints.

    `key` "" parses the whole parameter tree (`SFTParameters`): paths then start at the section.
    """
    try:
        return model.model_validate(values or {})
    except ValidationError as exc:
        errors = exc.errors()
        # A union (`report_to: name | [names]`) reports one error per member, tagged
        # `literal[...]`/`list[...]` in the location: keep the key path, and only the member
        # errors that are about the value rather than its shape.
        paths = [_key_path(key, err["loc"]) for err in errors]
        about_value = {p for p, e in zip(paths, errors, strict=True) if not _shape_error(e)}
        problems = []
        for path, err in zip(paths, errors, strict=True):
            covered = any(p == path or p.startswith(path + ".") for p in about_value)
            if covered and _shape_error(err):
                continue
            hint = ""
            if err["type"] == "extra_forbidden":
                loc = [str(p) for p in err["loc"]]
                allowed = _allowed_keys(model, loc[:-1])
                close = difflib.get_close_matches(loc[-1], allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                hint += f" (allowed keys: {', '.join(allowed)})"
            elif err["type"] in ("literal_error", "enum") and isinstance(err["input"], str):
                hint = _nearest_value(err["input"], str(err.get("ctx", {}).get("expected", "")))
            problem = f"  {path}: {err['msg']}{hint}"
            if problem not in problems:
                problems.append(problem)
        where = f" in `{key}`" if key else ""
        raise ConfigError(f"invalid parameters{where}:\n" + "\n".join(problems)) from None


def _key_path(key: str, loc: tuple) -> str:
    # Union member tags (`literal['a','b']`, `list[...]`) are not keys; list indices are.
    parts = [str(p) for p in loc if isinstance(p, int) or re.fullmatch(r"[\w-]+", str(p))]
    return ".".join([key, *parts] if key else parts)


def _shape_error(err: dict[str, Any]) -> bool:
    """Errors that only say the value has another type than one member of a union wants."""
    if err["type"] == "literal_error":
        return isinstance(err["input"], (list, dict))  # a list checked against one name
    return err["type"] in ("list_type", "string_type", "dict_type", "none_required")


def _nearest_value(value: str, expected: str) -> str:
    """ " (did you mean `cosine`?)" for `cosnie`, from pydantic's quoted list of valid values."""
    valid = re.findall(r"'([^']*)'", expected)
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys of the section at `loc` below `model` (the model of an unknown key's parent)."""
    for part in loc:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        inner = getattr(fields.get(part), "annotation", None)
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
    return sorted(f.alias or n for n, f in model.model_fields.items())


def validate_parameters(values: dict[str, Any] | None) -> SFTParameters:
    """The whole parameter tree, checked at once: every section, and no unknown top-level key.

    A node reads only its own keys, so a misspelt section (`trainig:`) would otherwise run the
    defaults without a word.
    """
    params = parse_section(SFTParameters, values, "")
    training_method(params.quantization, params.lora)  # rules across sections
    return params
