"""Typed configuration: one pydantic model per top-level key of `parameters_sft.yml`.

Each node parses the parameter sections it reads once, at its start, so a typo or a bad value
fails with the key path and the allowed values before any expensive work. Rules that involve
more than one section (`training_method`) live here too.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sft_pipeline.common.errors import UserError

# Seeds go to numpy, whose seeds are 32-bit unsigned integers.
SEED_MAX = 2**32 - 1


def as_list(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """A parameter that takes one string or a list of them (`data.path`, `training.report_to`),
    as a list."""
    return [value] if isinstance(value, str) else list(value)


class ConfigError(UserError, ValueError):
    """A parameter section failed validation; the message names every bad key path."""


class _Section(BaseModel):
    # extra="forbid": an unknown key is almost always a typo (`learning_rte`), never intended.
    model_config = ConfigDict(extra="forbid", frozen=True)


SchemaName = Literal["auto", "prompt_response", "alpaca", "messages", "sharegpt", "text"]


class DataConfig(_Section):
    path: str | list[str] = "data/01_raw/demo_sft.jsonl"
    schema_: SchemaName = Field("auto", alias="schema")
    # Maps our field names (prompt, response, instruction, input, output, system, messages,
    # conversations, text) to the dataset's column names.
    columns: dict[str, str] = Field(default_factory=dict)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = Field(42, ge=0, le=SEED_MAX)
    # For hf://datasets/<owner>/<name> paths: which split, and which config of the dataset.
    split: str = Field("train", min_length=1)
    subset: str | None = None
    # Records read, converted and written per chunk: bounds ingestion's memory, never its output.
    chunk_rows: int = Field(10_000, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ValidationConfig(_Section):
    max_rejected_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_chars: int = Field(32_000, gt=0)
    require_assistant_last: bool = True
    reject_duplicates: bool = True
    # Images: larger ones are rejected (decoding them costs memory long before training does).
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_image_bytes: int = Field(50 * 2**20, gt=0)


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


class TokenizationConfig(_Section):
    max_seq_length: int = Field(512, gt=1)
    batch_size: int = Field(256, gt=0)


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
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False


class TrainingConfig(_Section):
    output_dir: str = "data/06_models/checkpoints"
    num_train_epochs: float = Field(1.0, gt=0)
    # -1: train num_train_epochs; otherwise this many optimizer steps.
    max_steps: int = Field(-1, ge=-1)
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    optim: Literal["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor"] = "adamw_torch"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    packing: bool = True
    # Without packing: each batch's rows re-packed into rows of at most max_length tokens
    # (same rows and loss per step, no compute on padding).
    padding_free: bool = False
    pad_to_multiple_of: int | None = Field(8, gt=0)
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0)
    # null: keep every checkpoint.
    save_total_limit: int | None = Field(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    resume: Literal["auto", "never"] = "auto"
    report_to: str | list[str] = "none"
    # DVCLive's folder (report_to: dvclive): per-step metrics and plots that DVC reads.
    live_dir: str = "data/08_reporting/dvclive"
    seed: int = Field(42, ge=0, le=SEED_MAX)
    num_processes: int = Field(1, gt=0)
    # An accelerate config file (FSDP2, DeepSpeed ZeRO, several machines) for num_processes > 1;
    # null: plain DDP on this machine.
    accelerate_config: str | None = None
    dataloader_num_workers: int = Field(0, ge=0)
    # Vision-language models: the language model trains; these add the vision tower and the
    # projector (LoRA adapters on their linear layers, or their weights in a full fine-tune).
    train_vision_tower: bool = False
    train_projector: bool = False

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


class EvaluationConfig(_Section):
    max_samples: int = Field(50, ge=0)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)


GGUFType = Literal["f32", "f16", "bf16", "q8_0"]


class ExportConfig(_Section):
    # GGUF files to write for llama.cpp and Ollama; empty writes none (the export is optional and
    # a q8_0 of a 7B takes minutes and 7 GB).
    gguf: list[GGUFType] = Field(default_factory=list)

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
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            path = ".".join([key, *loc] if key else loc)
            hint = ""
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(model, loc[:-1])
                close = difflib.get_close_matches(loc[-1], allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                hint += f" (allowed keys: {', '.join(allowed)})"
            problems.append(f"  {path}: {err['msg']}{hint}")
        where = f" in `{key}`" if key else ""
        raise ConfigError(f"invalid parameters{where}:\n" + "\n".join(problems)) from None


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
