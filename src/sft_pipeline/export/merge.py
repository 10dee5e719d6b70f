"""Merge a trained adapter into a full-precision base and save a standalone model folder.

The base is always reloaded from disk in fp32: merging into a 4-bit model re-quantizes the
merged weights, and on CPUs with avx512_bf16 bitsandbytes repacks 4-bit weights in place after
the first inference, which silently corrupts a merge (seen with bitsandbytes on CPU).
The saved folder is usable without this project: safetensors weights, tokenizer with its chat
template, a generation config that stops at the end-of-turn token and pads with a non-EOS
token, and a model card.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import DataConfig, TemplateConfig
from sft_pipeline.export.errors import NotShardwise
from sft_pipeline.export.finite import require_finite, require_finite_model
from sft_pipeline.export.model_card import model_card
from sft_pipeline.export.prompting import write_prompting
from sft_pipeline.model.loading import (
    is_vision_model,
    load_model,
    load_processor,
    load_tokenizer,
    model_source,
    read_manifest,
    trust_remote_code,
)
from sft_pipeline.model.stop_tokens import configure_special_tokens

log = logging.getLogger(__name__)


@dataclass
class MergedModel:
    """A merged (or passed-through) model ready to be saved as a standalone folder."""

    model: Any
    tokenizer: Any
    model_card: str
    # The run's `template` parameters: recorded beside the weights (`export/prompting.py`) so
    # that chat and the Ollama export prompt the model as training did.
    template_cfg: TemplateConfig | None = None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (path / "README.md").write_text(self.model_card, encoding="utf-8")
        if self.template_cfg is not None:
            write_prompting(path, self.template_cfg)


def adapter_kind(adapter_dir: Path) -> str:
    """ "peft" for a PEFT adapter folder, "full" for a full model folder (full fine-tuning)."""
    if (adapter_dir / "adapter_config.json").is_file():
        return "peft"
    if (adapter_dir / "config.json").is_file() and any(adapter_dir.glob("*.safetensors")):
        return "full"
    raise FileNotFoundError(
        f"{adapter_dir}: expected a PEFT adapter (adapter_config.json + adapter_model.safetensors)"
        " or a full model (config.json + *.safetensors)"
    )


def merge(
    base_model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    data_cfg: DataConfig,
    training_summary: dict[str, Any],
    template_cfg: TemplateConfig | None = None,
    merge_base: str | None = None,
) -> MergedModel:
    """The merged model; `merge_base` (`merge.base_model`) names other weights to merge into."""
    from sft_pipeline.data.templating import trained_template

    base_model_dir, adapter_dir = Path(base_model_dir), Path(adapter_dir)
    manifest = read_manifest(base_model_dir)
    kind = adapter_kind(adapter_dir)
    has_tokenizer = any(adapter_dir.glob("tokenizer*"))
    vision = is_vision_model(base_model_dir)
    processor = None
    if vision:
        # The processor travels with the model (image processor settings, image tokens).
        has_processor = (adapter_dir / "processor_config.json").is_file()
        processor = load_processor(adapter_dir if has_processor else base_model_dir)
        tokenizer = processor.tokenizer
    else:
        tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base_model_dir)
    template = trained_template(tokenizer, template_cfg) if template_cfg is not None else None
    if template is not None:
        # The merged model answers in the format it was trained on, so its tokenizer carries
        # the template the data was rendered with (a base model's plain layout included), not
        # the base's own (or none).
        tokenizer.chat_template = template[0]
        if processor is not None:
            processor.chat_template = template[0]
        log.info("merged tokenizer gets %s as its chat template", template[1])
    adapter_config: dict[str, Any] = {}
    if kind == "peft":
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text("utf-8"))
        require_finite_adapter(adapter_dir)
    if kind == "peft" and vision:
        # The whole model through PEFT (fp32): transformers maps each family's checkpoint
        # prefixes (`language_model.model.*` and the like) both ways, and the untrained vision
        # tower and projector pass through unchanged.
        model = _merge_whole_model(base_model_dir, adapter_dir, len(tokenizer), manifest)
        merged_into = "the base weights (whole model; vision tower and projector passed through)"
    elif kind == "peft":
        model, merged_into = merge_weights(base_model_dir, adapter_dir, len(tokenizer), merge_base)
    else:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        log.info("%s holds a full model (full fine-tuning): passing it through", adapter_dir)
        merged_into = None
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        model = auto.from_pretrained(
            str(adapter_dir),
            use_safetensors=True,
            dtype="auto",
            trust_remote_code=trust_remote_code(base_model_dir),
        )
        require_finite_model(model, str(adapter_dir))
    eos_ids, pad_id = configure_special_tokens(model, tokenizer)
    template_date = template_cfg.date if template_cfg else None
    card = model_card(
        manifest,
        kind,
        adapter_config,
        data_cfg,
        training_summary,
        eos_ids,
        pad_id,
        tokenizer,
        system_prompt=template_cfg.system_prompt if template_cfg else None,
        trained_template=template,
        merged_into=merged_into,
        template_date=template_date,
    )
    return MergedModel(
        model=model.eval(),
        tokenizer=processor or tokenizer,
        model_card=card,
        template_cfg=template_cfg,
    )


def merge_weights(
    base_model_dir: Path, adapter_dir: Path, vocab_size: int, merge_base: str | None = None
):
    """(merged model, the weights it was merged into, for the model card).

    Tensor by tensor (`sft_pipeline.export.shard_merge`: one tensor in memory, fp32 arithmetic
    rounded once to the checkpoint's dtype, the checkpoint's shard layout) into the base's own
    checkpoint, dequantized when it exists only in 4-bit, or into `merge_base`. Adapters only
    PEFT can merge go through `merge_adapter` (whole model, fp32).
    """

    from sft_pipeline.export import shard_merge
    from sft_pipeline.model.base_model import resolve_weights_folder

    manifest = read_manifest(base_model_dir)
    prequantized = bool(manifest.get("quantization"))
    if merge_base:
        weights = resolve_weights_folder(merge_base)
        merged_into = f"the full-precision weights of `{merge_base}` (merge.base_model)"
    else:
        weights = local_weights_folder(base_model_dir)
        merged_into = (
            "the dequantized 4-bit weights of the pre-quantized base, the weights the adapter "
            "was trained against"
            if prequantized
            else "the base weights, in their stored dtype"
        )
    try:
        model = shard_merge.ShardwiseMerge(
            weights, adapter_dir, trust_remote_code=trust_remote_code(base_model_dir)
        )
    except NotShardwise as exc:
        if prequantized and not merge_base:
            raise ValueError(
                f"{adapter_dir}: cannot merge into the pre-quantized base ({exc}); set "
                "merge.base_model to its full-precision original"
            ) from None
        log.warning("merging the whole model with PEFT (in fp32 memory): %s", exc)
        source = weights if merge_base else base_model_dir
        return _merge_whole_model(source, adapter_dir, vocab_size, manifest), merged_into
    if vocab_size > model.vocab_size:
        # The trainer added tokens (e.g. a pad token): the merged embeddings need their rows.
        model.resize_token_embeddings(vocab_size)
    log.info("merging tensor by tensor into %s (%s)", weights, merged_into)
    return model, merged_into


def local_weights_folder(model_dir: Path) -> Path:
    """The local folder holding a prepared base model's safetensors (a hub snapshot if need be)."""
    path, revision = model_source(model_dir)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    )


def _merge_whole_model(weights: Path, adapter_dir: Path, vocab_size: int, manifest: dict):
    """The whole model merged through PEFT in fp32, checked finite, in the base's stored dtype."""
    import torch

    model = merge_adapter(weights, adapter_dir, vocab_size)
    require_finite_model(model, f"merging {adapter_dir} into {weights}")
    stored = manifest.get("stored_dtype") or manifest.get("dtype") or "float32"
    return model.to(getattr(torch, stored))


def require_finite_adapter(adapter_dir: Path) -> None:
    """Refuse an adapter with NaN or infinite weights before merging anything (tensor named);
    the shard-wise merge checks every merged tensor too, as it writes it."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            require_finite(f.get_tensor(name), name, str(path))


def merge_adapter(base_model_dir: Path, adapter_dir: Path, vocab_size: int):
    """Base reloaded in fp32 from disk + PEFT adapter, merged into plain linear layers."""
    import torch
    from peft import PeftModel

    base = load_model(base_model_dir, quantization=None, dtype=torch.float32)
    if vocab_size > base.get_input_embeddings().num_embeddings:
        # The trainer added tokens (e.g. a pad token): the adapter's saved embeddings expect them.
        base.resize_token_embeddings(vocab_size)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model = peft_model.merge_and_unload()
    leftovers = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if "4bit" in type(m).__name__ or "Lora" in type(m).__name__
        }
    )
    if leftovers:
        raise RuntimeError(f"merge left non-plain layers in the model: {leftovers}")
    return model


# --- model card ---------------------------------------------------------------------------------
