"""What `SFTTrainer` checks and resolves about its inputs before any data is prepared.

Each check fails with a `ValueError` that names the argument and what to do: a missing
`train_dataset`, a `with_transform` dataset (preparation would bake its transform into the
tokens), mask columns without labels when preparation is skipped, prompt-learning adapters with
packed rows. `chat_template_path` replaces the tokenizer's template here, before the
data is rendered with it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from datasets import Dataset, IterableDataset

from sft_pipeline.trainer.sft_config import SFTConfig

log = logging.getLogger(__name__)

# The tags a model trained here carries on its card (`model.add_model_tags`).
MODEL_TAGS = ("sft", "sft-pipeline")


def check_train_dataset(train_dataset: Any) -> None:
    if train_dataset is None:
        raise ValueError(
            "SFTTrainer: `train_dataset` is required (a datasets.Dataset or IterableDataset of "
            "text, prompt/completion, messages or input_ids rows)"
        )
    if not isinstance(train_dataset, (Dataset, IterableDataset)):
        raise ValueError(
            f"SFTTrainer: train_dataset must be a datasets.Dataset or IterableDataset, got "
            f"{type(train_dataset).__name__}"
        )


def check_preparable(dataset: Any, name: str) -> None:
    """A `with_transform` dataset cannot be prepared: its transform runs on every read."""
    if isinstance(dataset, Dataset) and dataset.format.get("type") == "custom":
        raise ValueError(
            f"{name} uses Dataset.with_transform(): preparing it would tokenize the transform's "
            "output once and train on that fixed result, so a random augmentation would silently "
            "stop being random. Either pass dataset_kwargs={'skip_prepare_dataset': True} with a "
            "transform that returns trainer-ready rows (input_ids, labels), or apply a "
            "deterministic transform with Dataset.map() before building the trainer"
        )


# Larger than any batch: every row of the batch fits in one.
WHOLE_BATCH = 2**31 - 1


def padding_free_capacity(args: SFTConfig) -> int | None:
    """The row size padding-free batches are re-packed into, None when not padding-free.

    With `padding_free_row_tokens` a batch becomes rows of at most that many tokens; without it
    the whole batch is one row, as in TRL. Image rows (the only ones padding-free with a
    `max_length`) are re-packed into `max_length` rows.
    """
    if not args.padding_free:
        return None
    return args.padding_free_row_tokens or args.max_length or WHOLE_BATCH


def check_padding_free(args: SFTConfig, vision_model: bool) -> None:
    """A padding-free batch joins its rows, so `max_length` cannot bound the row the model sees;
    refused as TRL refuses it (image rows are exempt there too: their batches are re-packed
    into `max_length` rows)."""
    if args.padding_free and not args.packing and args.max_length is not None and not vision_model:
        raise ValueError(
            f"SFTConfig: with padding_free=True and packing=False, `max_length` is not enforced "
            f"(each batch's rows are joined into one row longer than max_length={args.max_length})."
            " Set packing=True, or max_length=None with rows already truncated (add "
            "padding_free_row_tokens=N to re-pack each batch into rows of at most N tokens)"
        )


def check_prompt_learning(model, args: SFTConfig) -> None:
    """Prompt-learning adapters put virtual tokens in front of each row: packed rows (several
    sequences, one mask) cannot take them."""
    from sft_pipeline.trainer.loss import is_prompt_learning

    if is_prompt_learning(model) and (args.packing or args.padding_free):
        raise ValueError(
            "SFTConfig: packing and padding_free join several sequences into one row, which a "
            "prompt-learning adapter (prompt tuning, prefix tuning, p-tuning) cannot prefix with "
            "its virtual tokens; set packing=False and padding_free=False"
        )


def skips_preparation(args: SFTConfig) -> bool:
    return bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))


def check_unprepared(datasets: dict[str, Any]) -> None:
    """Rows handed to the collator as they are must be tokenized, with labels where masked."""
    for name, dataset in datasets.items():
        columns = _columns(dataset)
        if columns is not None and "input_ids" not in columns:
            raise ValueError(
                f"{name}: dataset_kwargs={{'skip_prepare_dataset': True}} hands rows to the "
                f"collator as they are, so they need input_ids; the columns are {sorted(columns)}"
            )
        masks = {"completion_mask", "assistant_masks"} & set(columns or ())
        if masks and "labels" not in columns:
            raise ValueError(
                f"{name} has {sorted(masks)} but no labels, and skip_prepare_dataset=True skips "
                "building labels from masks, so every token would train. Add a 'labels' column "
                "(-100 where no loss) or drop skip_prepare_dataset"
            )


def _columns(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)
        names = list(first) if first is not None else None
    return names


def apply_chat_template_path(model, tokenizer, path: str):
    """The tokenizer with the chat template of `path`: a .jinja/.j2 file, or a tokenizer folder
    or Hub id whose template (and end-of-turn token, when the model lacks it) is taken over.

    Returns the model, whose embeddings grow when the template's special tokens are new to it.
    """
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if os.path.isfile(path):
        if not path.endswith((".jinja", ".j2")):
            raise ValueError(
                f"SFTConfig.chat_template_path: {path!r} is a file but not a .jinja/.j2 template"
            )
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
        return model
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(path)
    if not source.chat_template:
        raise ValueError(f"SFTConfig.chat_template_path: tokenizer {path!r} has no chat template")
    tokenizer.chat_template = source.chat_template
    # The template's control tokens (its end-of-turn, role markers) must be single tokens here.
    new = [t for t in source.all_special_tokens if t not in text_tokenizer.get_vocab()]
    if new:
        text_tokenizer.add_special_tokens({"additional_special_tokens": new})
        log.info("chat_template_path %s: added special tokens %s", path, new)
    if source.eos_token and source.eos_token != text_tokenizer.eos_token:
        text_tokenizer.eos_token = source.eos_token
        model.config.eos_token_id = text_tokenizer.eos_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = text_tokenizer.eos_token_id
    if len(text_tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(text_tokenizer))
    return model
