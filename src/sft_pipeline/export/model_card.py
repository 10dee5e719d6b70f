"""The merged model's card (`README.md`): what was trained, on what, how, and how to prompt it."""

from __future__ import annotations

import json
from typing import Any

from sft_pipeline.common.config import DataConfig, as_list


def _template_section(trained_template: tuple[str, str] | None) -> list[str]:
    """The chat template the data was rendered with, when it is not the base tokenizer's own:
    prompts must be written in this layout (the tokenizer's chat template renders it)."""
    if trained_template is None:
        return []
    source, name = trained_template
    return [
        "## Prompt format",
        "",
        f"Trained on conversations rendered with {name}; this folder's tokenizer carries it as "
        "its chat template:",
        "",
        "```jinja",
        source.strip(),
        "```",
        "",
    ]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, str | int | float | bool) or value is None:
            flat[name] = value
        elif isinstance(value, list) and len(value) <= 16:
            flat[name] = ", ".join(map(str, value))
    return flat


def _method(kind: str, flat_summary: dict[str, Any]) -> str:
    if kind == "full" or flat_summary.get("method") == "full":
        return "full-fine-tuning"
    if flat_summary.get("method") in ("qlora", "lora"):
        return flat_summary["method"]
    quantized = any(k.endswith("load_in_4bit") and v is True for k, v in flat_summary.items())
    return "qlora" if quantized else "lora"


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")


def model_card(
    manifest: dict[str, Any],
    kind: str,
    adapter_config: dict[str, Any],
    data_cfg: DataConfig,
    training_summary: dict[str, Any],
    eos_ids: list[int],
    pad_id: int,
    tokenizer,
    system_prompt: str | None = None,
    trained_template: tuple[str, str] | None = None,
    merged_into: str | None = None,
    template_date: Any = None,
) -> str:
    """README.md with YAML front-matter; deterministic for the same inputs (no timestamps)."""
    # Wall-clock fields differ on every run; leaving them out keeps the card reproducible.
    flat = {k: v for k, v in _flatten(training_summary or {}).items() if "runtime" not in k}
    method = _method(kind, flat)
    base = manifest.get("name") or manifest.get("model_path")
    tags = ["sft-pipeline", method] + (["lora"] if method == "qlora" else [])
    front = ["---", f"base_model: {json.dumps(base)}", "library_name: transformers"]
    front += ["pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags], "---", ""]
    lines = [
        f"# {base} fine-tuned with sft-pipeline ({method})",
        "",
        "A standalone model: the adapter is merged into "
        + (merged_into or "the full-precision base weights")
        + ", so no PEFT or sft-pipeline code is needed to load it.",
        "",
        "## Base model",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("name", "source", "model_path", "revision", "content_hash", "architecture"):
        lines.append(f"| {key} | {_format(manifest.get(key))} |")
    lines.append(f"| parameters | {manifest.get('num_parameters', 0):,} |")
    lines.append(f"| dtype | {_format(manifest.get('dtype'))} |")
    if manifest.get("quantization"):
        lines.append(f"| pre-quantized | {_format(json.dumps(manifest['quantization']))} |")
    paths = as_list(data_cfg.path)
    lines += [
        "",
        "## Data",
        "",
        f"- path: {', '.join(f'`{p}`' for p in paths)}",
        f"- schema: `{data_cfg.schema_}`",
        f"- column map: `{json.dumps(data_cfg.columns, sort_keys=True)}`",
        f"- eval fraction: {data_cfg.eval_fraction} (split seed {data_cfg.seed})",
        "",
        "## Training",
        "",
    ]
    if adapter_config:
        for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"):
            if key in adapter_config:
                value = adapter_config[key]
                if isinstance(value, list):
                    # PEFT stores "all-linear" expanded to full module paths: show leaf names.
                    value = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in value}))
                lines.append(f"- adapter {key}: `{value}`")
        lines.append("")
    losses = {k: v for k, v in flat.items() if "loss" in k and isinstance(v, int | float)}
    if losses:
        lines += ["Final losses:", ""]
        lines += [f"- {k}: {_format(v)}" for k, v in sorted(losses.items())] + [""]
    if flat:
        lines += ["| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {_format(v)} |" for k, v in sorted(flat.items())]
        lines.append("")
    eos_tokens = ", ".join(f"`{tokenizer.convert_ids_to_tokens(i)}` ({i})" for i in eos_ids)
    lines += [
        "## Generation",
        "",
        f"- stops at: {eos_tokens}",
        f"- pads with: `{tokenizer.convert_ids_to_tokens(pad_id)}` ({pad_id}), not an EOS token",
        f"- chat template: {'included' if tokenizer.chat_template else 'none'}",
        *([f"- trained with the system prompt: {system_prompt!r}"] if system_prompt else []),
        *(
            [
                f"- template date: `{template_date}` (the training data was rendered with it as "
                "`date_string` and as what `strftime_now` returns; pass "
                f'`date_string="{template_date:%d %b %Y}"` to prompt as in training)'
            ]
            if template_date is not None
            else []
        ),
        "",
        *_template_section(trained_template),
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
        ")",
        "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
        'reply = output[0, inputs["input_ids"].shape[1] :]',
        "print(tokenizer.decode(reply, skip_special_tokens=True))",
        "```",
        "",
    ]
    return "\n".join(front + lines)
