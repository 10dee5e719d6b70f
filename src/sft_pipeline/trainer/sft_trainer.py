"""`SFTTrainer`: a `transformers.Trainer` for supervised fine-tuning with a TRL-like constructor.

What it adds to `Trainer`:
- TRL's dataset types (language modelling, prompt-completion, conversational, pre-tokenized),
  the pipeline's record formats, and streamed `IterableDataset`s, turned into `input_ids`/`labels`
  by the pipeline's own templating and tokenization code (`data_prep.py`); base models without a
  chat template work as they are;
- best-fit-decreasing packing whose sequences never see each other: an explicit block-diagonal
  4-D mask on sdpa/eager, padding-free varlen on flash-attention, `use_cache=False` always;
  the same per batch with `padding_free` (same rows per step, no compute on padding);
- a loss that is the mean over the supervised tokens of the whole optimizer step, computed with
  the LM head applied only to supervised positions, in chunks (`loss.py`);
- logged `mean_token_accuracy`, `num_tokens`, `supervised_tokens` and non-padding tokens/s;
- a stop at the first optimizer step with a non-finite loss or gradient norm, on every process,
  before the step is applied or checkpointed (`guard.py`): diverged weights are never saved.

The `Trainer` methods it overrides, and why (each calls the original where it still applies):

    __init__                  TRL's constructor: a model id, `peft_config`, raw datasets prepared
    compute_loss              the chunked supervised-token loss (`loss.py`), `loss_type`
    training_step             hands the step's loss to the non-finite guard
    evaluate                  prepares a raw eval dataset (plain, dict, stream) as training does
    prediction_step           logits only when a metric asks (`compute_metrics`,
                              `preprocess_logits_for_metrics`); the chunked loss otherwise
    log                       token metrics (accuracy, supervised tokens, tokens/s) in each log
    _get_train_sampler        seeded length-grouped order (private: transformers_private)
    _get_grad_norm            the pre-clip norm for the guard (private)
    _track_num_input_tokens   non-padding counts of packed rows (private)
    _save_checkpoint, _save   marked checkpoints, rotation among ours, JSON arguments
                              (`checkpoints.py`; private)

The private ones are listed, with the transformers release they were checked against, in
`sft_pipeline.common.transformers_private`, which checks at import that they still exist.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from sft_pipeline.common.transformers_private import check_trainer_hooks
from sft_pipeline.trainer import inputs as checks
from sft_pipeline.trainer import vision
from sft_pipeline.trainer.checkpoints import OwnCheckpoints
from sft_pipeline.trainer.collator import DataCollatorForSFT
from sft_pipeline.trainer.data_prep import prepare_dataset
from sft_pipeline.trainer.guard import NonFiniteGuard
from sft_pipeline.trainer.loss import (
    causal_lm_loss,
    logits_cross_entropy,
    model_logits,
    shift,
    unwrap,
)
from sft_pipeline.trainer.running_metrics import RunningMetrics
from sft_pipeline.trainer.sampling import SeededLengthGroupedSampler, row_lengths
from sft_pipeline.trainer.sft_config import SFTConfig

log = logging.getLogger(__name__)
check_trainer_hooks(Trainer)


# Config attributes that change logits after the LM head; with any of them set, the loss goes
# through the model's own forward (full logits) instead of the chunked head.
class SFTTrainer(OwnCheckpoints, Trainer):
    """Supervised fine-tuning trainer; accepts what users of TRL's `SFTTrainer` write."""

    def __init__(
        self,
        model: nn.Module | str | os.PathLike | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset] | None = None,
        processing_class=None,
        *,
        tokenizer=None,
        dataset_text_field: str | None = None,
        formatting_func: Callable[[Any], str | list[str]] | None = None,
        max_seq_length: int | None = None,
        max_length: int | None = None,
        peft_config=None,
        packing: bool | None = None,
        **kwargs: Any,
    ):
        if model is None:
            raise ValueError("SFTTrainer needs `model`: a model object or a name/path to load")
        args = _sft_args(args, model)
        checks.check_train_dataset(train_dataset)
        if not checks.skips_preparation(args):
            # Before the model loads: nothing expensive runs for a dataset that cannot be used.
            checks.check_preparable(train_dataset, "train_dataset")
        eval_follows_train = args.eval_packing == args.packing
        overrides = {
            "dataset_text_field": dataset_text_field,
            "max_length": max_seq_length if max_seq_length is not None else max_length,
            "packing": packing,
        }
        for key, value in overrides.items():
            if value is not None:
                setattr(args, key, value)
        args.max_seq_length = args.max_length
        if packing is not None and eval_follows_train:
            args.eval_packing = packing
        # Our prepared datasets hold only what the collator needs; Trainer's column pruning by
        # the model's forward signature would drop `seq_lengths`.
        args.remove_unused_columns = False
        if (
            args.packing or args.padding_free
        ) and args.train_sampling_strategy == "group_by_length":
            # Packed rows are all about the same length; padding-free batches have no padding
            # for length grouping to save.
            args.train_sampling_strategy = "random"

        if isinstance(model, (str, os.PathLike)):
            init_kwargs = {"dtype": torch.float32, **(args.model_init_kwargs or {})}
            model = _auto_model(str(model)).from_pretrained(str(model), **init_kwargs)
        processing_class = processing_class if processing_class is not None else tokenizer
        if processing_class is None:
            processing_class = _auto_processing(model, model.config._name_or_path)
        # A vision-language model's processor holds the tokenizer.
        text_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if text_tokenizer.pad_token_id is None:
            # Only pads input_ids: labels are padded with -100, so EOS labels are never erased.
            text_tokenizer.pad_token = text_tokenizer.eos_token
        if args.chat_template_path is not None:
            model = checks.apply_chat_template_path(
                model, processing_class, args.chat_template_path
            )
        if peft_config is not None:
            model = _apply_peft(model, peft_config, args)
        checks.check_prompt_learning(model, args)
        checks.check_padding_free(args, vision.is_vision_model(model))
        if args.gradient_checkpointing and hasattr(model, "peft_config"):
            # Frozen embeddings give checkpointed blocks inputs without grad.
            model.enable_input_require_grads()

        self._formatting_func = formatting_func
        self._prepared: list = []  # what this trainer prepared (evaluate() leaves those as is)
        if checks.skips_preparation(args):
            named = (
                eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
            )
            checks.check_unprepared({"train_dataset": train_dataset, **named})
        else:
            train_dataset = self._prepare(train_dataset, processing_class, args, "train_dataset")
            if eval_dataset is not None:
                eval_dataset = self._prepare_eval(eval_dataset, processing_class, args)
        if data_collator is None:
            data_collator = DataCollatorForSFT(
                pad_token_id=text_tokenizer.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                padding_free_capacity=checks.padding_free_capacity(args),
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # compute_loss divides by `num_items_in_batch` (supervised tokens of the whole optimizer
        # step, counted by Trainer from the collator's `shift_labels`), so Trainer must count
        # them and must not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._sft_metrics = {"train": RunningMetrics(), "eval": RunningMetrics()}
        self._eval_prefix = "eval"
        self._guard = NonFiniteGuard(self)
        self.add_callback(self._guard)
        # No Mixture-of-Experts load-balancing loss is added to ours (TRL's public flag, for
        # code that reads it).
        self.aux_loss_enabled = False
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(list(checks.MODEL_TAGS))

    # ------------------------------------------------------------------ data

    def _prepare(self, dataset, processing_class, args: SFTConfig, name: str, packing=None):
        if any(dataset is done for done in self._prepared):
            return dataset
        checks.check_preparable(dataset, name)
        packing = args.packing if packing is None else packing
        prepared = prepare_dataset(
            dataset, processing_class, args, self._formatting_func, name, packing
        )
        self._prepared.append(prepared)
        return prepared

    def _prepare_eval(self, eval_dataset, processing_class, args: SFTConfig):
        if isinstance(eval_dataset, dict):
            return {
                key: self._prepare(
                    ds, processing_class, args, f"eval_dataset[{key}]", args.eval_packing
                )
                for key, ds in eval_dataset.items()
            }
        return self._prepare(
            eval_dataset, processing_class, args, "eval_dataset", args.eval_packing
        )

    # ------------------------------------------------------------------ data order

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(
            train_dataset, Dataset
        ):
            # random: accelerate's seedable sampler, seeded by data_seed + epoch.
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            row_lengths(train_dataset, self.args.length_column_name),
            seed,
        )

    # ------------------------------------------------------------------ loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self._training_step(model, inputs, num_items_in_batch)
        self._guard.values.add_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # The pre-clip norm Trainer computed for this step, for the guard (after clipping, the
        # gradients of an infinite norm are zeros and would look finite).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard.values.grad_norm = grad_norm
        return grad_norm

    def _training_step(self, model, inputs, num_items_in_batch=None):
        rows, length = inputs["input_ids"].shape
        budget = self.args.max_tokens_per_forward
        per_slice = max(1, budget // length) if budget else rows
        # Image arrays do not split by row (a row holds any number of images).
        if per_slice >= rows or num_items_in_batch is None or "pixel_values" in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        # Slices of the batch, each backpropagated at once: the gradient sum is the batch's
        # (every slice's loss is divided by the same num_items_in_batch), activations are not.
        total = 0
        for start in range(0, rows, per_slice):
            part = {
                key: value[start : start + per_slice]
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows
                else value
                for key, value in inputs.items()
            }
            total = total + super().training_step(model, part, num_items_in_batch)
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, _logits = self._loss(model, inputs, num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _loss(self, model, inputs, num_items_in_batch=None, with_logits: bool = False):
        """(loss, the model's logits when `with_logits` else None); the token metrics noted."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)
        if shift_labels is None:
            shift_labels = shift(labels)
        document_ids = inputs.pop("document_ids", None)
        token_weights = inputs.pop("shift_loss_weights", None)  # turn weights (collator)
        model_inputs, unflatten = self._model_inputs(model, inputs, document_ids)
        dft = self.args.loss_type == "dft"
        logits = None
        if with_logits:
            # For compute_metrics: one forward with full-vocabulary logits, the loss from them.
            logits = model_logits(model, model_inputs, unflatten, shift_labels.shape[1])
            loss_sum, correct, count = logits_cross_entropy(
                logits, shift_labels, dft=dft, token_weights=token_weights
            )
        else:
            loss_sum, correct, count = causal_lm_loss(
                model,
                model_inputs,
                shift_labels,
                chunk_size=self.args.loss_chunk_size,
                # A model wrapped for distribution (DDP, FSDP) syncs gradients in its own forward.
                chunked=model is self.model,
                unflatten=unflatten,
                dft=dft,
                token_weights=token_weights,
            )
        denominator = num_items_in_batch if num_items_in_batch is not None else count
        loss = loss_sum / torch.clamp(torch.as_tensor(denominator, device=loss_sum.device), min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        if document_ids is not None:
            real_tokens = (document_ids > 0).sum()
        else:
            real_tokens = inputs["attention_mask"].sum()
        window = self._sft_metrics["train" if model.training else "eval"]
        window.add(loss_sum.detach(), correct, count, real_tokens)
        return loss, logits

    def _model_inputs(self, model, inputs: dict, document_ids: torch.Tensor | None):
        """Forward kwargs that keep packed sequences apart on the model's attention backend."""
        # With the cache on, transformers 5 ignores the packed position_ids (sequences attend
        # to each other), and training never needs a cache.
        model_inputs = {**inputs, "use_cache": False}
        if document_ids is None:
            return model_inputs, lambda t: t
        config = unwrap(model).config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        batch, length = document_ids.shape
        if "image_grid_thw" in inputs:
            if "flash" in impl:
                raise ValueError(
                    "packed rows with 3-D rotary positions (Qwen2-VL) need sdpa or eager "
                    "attention (model.attn_implementation), or training.packing: false"
                )
            model_inputs["position_ids"] = vision.packed_rope_positions(
                unwrap(model), inputs, document_ids
            )
        if "flash" in impl:
            # Varlen flash attention reads sequence starts from position_ids restarting at 0;
            # one flattened row per batch makes every sequence (and the padding) its own span.
            model_inputs["input_ids"] = inputs["input_ids"].reshape(1, -1)
            model_inputs["position_ids"] = inputs["position_ids"].reshape(1, -1)
            return model_inputs, lambda t: t.reshape(batch, length, -1)
        window = getattr(config, "sliding_window", None)
        if window is not None and length > window:
            # transformers builds sliding-window masks itself from the restarted position_ids.
            return model_inputs, lambda t: t
        allowed = document_ids[:, :, None] == document_ids[:, None, :]
        allowed &= torch.ones(length, length, dtype=torch.bool, device=allowed.device).tril()
        # Padding is one more "sequence": its queries see themselves, so no row is all -inf.
        if impl == "sdpa":
            mask = allowed[:, None]
        else:
            dtype = unwrap(model).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            mask = mask[:, None]
        model_inputs["attention_mask"] = mask
        return model_inputs, lambda t: t

    # ------------------------------------------------------------------ eval

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            # A raw dataset passed here is prepared as the one given at construction was.
            if checks.skips_preparation(self.args):
                named = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
                checks.check_unprepared(named)
            else:
                eval_dataset = self._prepare_eval(eval_dataset, self.processing_class, self.args)
        # With a dict of eval sets, Trainer evaluates each under "eval_<name>": our token
        # metrics must carry the same prefix as its loss.
        self._eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = "eval"

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Logits only when a metric asks for them (Trainer passes prediction_loss_only=False
        # when compute_metrics is set): full-vocabulary logits over the eval set are the classic
        # eval OOM, and the loss and token metrics need none (the chunked head).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, logits = self._loss(model, inputs, with_logits=True)
        return loss.detach(), logits, inputs["labels"]

    # ------------------------------------------------------------------ logging

    def _track_num_input_tokens(self, inputs):
        if "document_ids" in inputs and self.args.include_num_input_tokens_seen == "non_padding":
            # Packed rows carry no attention_mask, and a pad id equal to EOS would miscount.
            real = (inputs["document_ids"] > 0).sum()
            self.state.num_input_tokens_seen += self.accelerator.gather(real).sum().item()
            return
        super()._track_num_input_tokens(inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = self._eval_prefix + "_"
        is_eval = any(key.startswith(prefix) for key in logs)
        window = self._sft_metrics["eval" if is_eval else "train"]
        if not is_eval and window.total_tokens == 0:
            # A resumed run: the running totals go on from the checkpoint's last log.
            window.continue_from(self.state.log_history)
        if self.accelerator.num_processes > 1:
            # Every process logs at the same steps: the window's counts become the sums over
            # all processes, so accuracy and token totals describe the global batch.
            window.reduce(self.accelerator)
        # In place: `evaluate()` returns this same dict to its caller.
        logs.update(window.flush(prefix=prefix if is_eval else ""))
        super().log(logs, start_time)


def _sft_args(args: TrainingArguments | None, model) -> SFTConfig:
    if args is None:
        name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
        return SFTConfig(output_dir=f"{os.path.basename(name.rstrip('/'))}-sft")
    if isinstance(args, SFTConfig):
        return args
    return SFTConfig.from_training_args(args)


def _auto_model(name: str):
    from transformers import AutoConfig, AutoModelForImageTextToText

    has_vision = getattr(AutoConfig.from_pretrained(name), "vision_config", None) is not None
    return AutoModelForImageTextToText if has_vision else AutoModelForCausalLM


def _auto_processing(model, name: str):
    """The model's processor (without a video part it cannot build here), else its tokenizer."""
    from sft_pipeline.model.loading import load_processor

    if vision.is_vision_model(model):
        return load_processor(name)
    return AutoTokenizer.from_pretrained(name)


def _apply_peft(model: nn.Module, peft_config, args: SFTConfig) -> nn.Module:
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if isinstance(model, PeftModel):
        raise ValueError(
            "model is already a PeftModel; pass the base model with peft_config, or the "
            "PeftModel without peft_config"
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(args.gradient_checkpointing),
            gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs,
        )
    if vision.is_vision_model(model) and peft_config.target_modules in ("all-linear", None):
        # The language model only: the vision tower and projector stay as pretrained.
        peft_config.target_modules = vision.lora_target_modules(
            model, "all-linear", {"language_model"}
        )
    return get_peft_model(model, peft_config)
