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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft_pipeline.common.ownership import CHECKPOINT_MARKER, own_checkpoints
from sft_pipeline.trainer import vision
from sft_pipeline.trainer.collator import DataCollatorForSFT
from sft_pipeline.trainer.data_prep import prepare_dataset
from sft_pipeline.trainer.guard import NonFiniteGuard
from sft_pipeline.trainer.loss import causal_lm_loss, shift, unwrap
from sft_pipeline.trainer.running_metrics import RunningMetrics
from sft_pipeline.trainer.sampling import SeededLengthGroupedSampler, row_lengths
from sft_pipeline.trainer.sft_config import SFTConfig

log = logging.getLogger(__name__)


# Config attributes that change logits after the LM head; with any of them set, the loss goes
# through the model's own forward (full logits) instead of the chunked head.
class SFTTrainer(Trainer):
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
        if peft_config is not None:
            model = _apply_peft(model, peft_config, args)
        if args.gradient_checkpointing and hasattr(model, "peft_config"):
            # Frozen embeddings give checkpointed blocks inputs without grad.
            model.enable_input_require_grads()

        if train_dataset is not None:
            train_dataset = prepare_dataset(
                train_dataset,
                processing_class,
                args,
                formatting_func,
                "train_dataset",
                args.packing,
            )
        if eval_dataset is not None:
            eval_dataset = _map_eval(eval_dataset, processing_class, args, formatting_func)
        if data_collator is None:
            data_collator = DataCollatorForSFT(
                pad_token_id=text_tokenizer.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                padding_free_capacity=args.max_length if args.padding_free else None,
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

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        """Mark the checkpoint folder as ours before anything goes in, and rotate only ours.

        Trainer's own rotation deletes the oldest `checkpoint-*` folders in `output_dir`,
        whoever wrote them; ours deletes only folders holding `CHECKPOINT_MARKER`.
        """
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            marker = {
                "written_by": "sft-pipeline",
                "step": self.state.global_step,
                # What the steps so far ran in: a resumed run goes on in the same precision.
                "precision": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32",
            }
            (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save and limit and limit > 0:
            self._rotate_own_checkpoints(run_dir, limit)

    def _rotate_own_checkpoints(self, run_dir: Path, limit: int) -> None:
        own = own_checkpoints(run_dir)
        best = self.state.best_model_checkpoint
        protected = {own[-1]} if own else set()
        if best:
            protected.add(Path(best))
        for checkpoint in own[: max(0, len(own) - max(limit, len(protected)))]:
            if checkpoint not in protected:
                log.info("deleting older checkpoint %s (save_total_limit %d)", checkpoint, limit)
                shutil.rmtree(checkpoint, ignore_errors=True)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        # Trainer pickles its arguments next to the weights; nothing reads them back on resume.
        # Keep them as JSON (tokens redacted by to_json_string) so no checkpoint file needs
        # unpickling to inspect.
        folder = output_dir if output_dir is not None else self.args.output_dir
        pickled = os.path.join(folder, TRAINING_ARGS_NAME)
        if os.path.exists(pickled):
            os.remove(pickled)
            with open(os.path.join(folder, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
                f.write(self.args.to_json_string())

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
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift_labels = inputs.pop("shift_labels", None)
        if shift_labels is None:
            shift_labels = shift(labels)
        document_ids = inputs.pop("document_ids", None)
        model_inputs, unflatten = self._model_inputs(model, inputs, document_ids)
        loss_sum, correct, count = causal_lm_loss(
            model,
            model_inputs,
            shift_labels,
            chunk_size=self.args.loss_chunk_size,
            # A model wrapped for distribution (DDP, FSDP) syncs gradients in its own forward.
            chunked=model is self.model,
            unflatten=unflatten,
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
        return (loss, {"loss": loss}) if return_outputs else loss

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
        # With a dict of eval sets, Trainer evaluates each under "eval_<name>": our token
        # metrics must carry the same prefix as its loss.
        self._eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = "eval"

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Never return logits: gathering full-vocabulary logits over the eval set is the
        # classic eval OOM; metrics come from compute_loss.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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


TRAINING_ARGS_JSON = "training_args.json"


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


def _map_eval(eval_dataset, tokenizer, args: SFTConfig, formatting_func):
    if isinstance(eval_dataset, dict):
        return {
            key: prepare_dataset(
                ds, tokenizer, args, formatting_func, f"eval_dataset[{key}]", args.eval_packing
            )
            for key, ds in eval_dataset.items()
        }
    return prepare_dataset(
        eval_dataset, tokenizer, args, formatting_func, "eval_dataset", args.eval_packing
    )
