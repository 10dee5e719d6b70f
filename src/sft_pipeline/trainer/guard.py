"""Stop training at the first optimizer step whose loss or gradient norm is not finite.

`transformers.Trainer` logs a NaN loss as the mean of earlier ones (`logging_nan_inf_filter`)
and steps on: the weights turn into NaN, and the run still saves, merges and ships them. The
guard runs right before each optimizer step, after the gradients are reduced and clipped:

    micro-batch 1..k: training_step  -> step loss += loss (this rank)
    clip / grad norm                 -> grad norm (the same on every rank after the reduction)
    on_pre_optimizer_step            -> gather [loss, grad norm] of every rank; any non-finite
                                        value -> every rank raises `TrainingDivergedError`
    optimizer.step()                 (never reached with non-finite values)
    checkpoint save                  (never reached: the last checkpoint stays the last good one)

Every rank sees the gathered values of all ranks and so decides the same: no rank waits in a
collective for one that stopped. Under fp16 with a loss scaler, an infinite gradient norm is the
scaler's business (it skips that step and lowers the scale); the loss is still checked.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from sft_pipeline.common import transformers_private
from sft_pipeline.common.errors import TrainingDivergedError
from sft_pipeline.common.ownership import own_checkpoints


class StepValues:
    """The loss summed over one optimizer step's micro-batches, and the step's gradient norm."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | float | None = None

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss

    def reset(self) -> None:
        self.loss, self.grad_norm = None, None


class NonFiniteGuard(TrainerCallback):
    """Raises `TrainingDivergedError` before an optimizer step with a non-finite loss or
    gradient norm on any rank (module doc). `SFTTrainer` adds it to itself."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.values = StepValues()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        values = self.values
        device = trainer.accelerator.device
        loss = values.loss if values.loss is not None else torch.tensor(0.0)
        norm = values.grad_norm
        if norm is None:
            norm = _grad_norm(model if model is not None else trainer.model)
        local = torch.stack(
            [loss.to(device).float().reshape(()), torch.as_tensor(norm).to(device).float()]
        )
        values.reset()
        everyone = trainer.accelerator.gather(local.reshape(1, 2)).reshape(-1, 2).cpu()
        losses, norms = everyone[:, 0].tolist(), everyone[:, 1].tolist()
        scaler_skips = getattr(trainer.accelerator, "scaler", None) is not None
        bad_loss = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        bad_norm = [] if scaler_skips else [r for r, v in enumerate(norms) if not math.isfinite(v)]
        if bad_loss or bad_norm:
            raise TrainingDivergedError(
                diverged_message(
                    step=state.global_step + 1,
                    max_steps=state.max_steps,
                    losses=losses,
                    grad_norm=norms[(bad_loss or bad_norm)[0]],
                    learning_rate=transformers_private.learning_rate(trainer),
                    ranks=sorted(set(bad_loss) | set(bad_norm)),
                    last_checkpoint=_last_checkpoint(args.output_dir),
                    fp16=bool(args.fp16),
                )
            )
        return control


def diverged_message(
    *,
    step: int,
    max_steps: int,
    losses: list[float],
    grad_norm: float,
    learning_rate: float,
    ranks: list[int],
    last_checkpoint: str | None,
    fp16: bool,
) -> str:
    """The user's error: where it diverged, the numbers, what stays, what to try."""
    loss = next((v for v in losses if not math.isfinite(v)), losses[0])
    where = f" (process {', '.join(map(str, ranks))} of {len(losses)})" if len(losses) > 1 else ""
    kept = (
        f"the last good checkpoint {last_checkpoint} is kept"
        if last_checkpoint
        else "no checkpoint was saved before it"
    )
    precision = (
        "fp32 or bf16 instead of fp16 (training.precision; fp16 overflows above 65504)"
        if fp16
        else "fp32 (training.precision) if it ran in bf16/fp16"
    )
    return (
        f"training diverged at optimizer step {step} of {max_steps}{where}: loss {loss:.6g}, "
        f"gradient norm {grad_norm:.6g}, learning rate {learning_rate:.6g}. Training stopped "
        f"before applying this step; {kept}, and no adapter or model was written.\n"
        f"  Try: a lower learning_rate (e.g. {learning_rate / 10:.3g}), a warmup "
        f"(warmup_ratio: 0.1), gradient clipping (max_grad_norm: 1.0), {precision}; a loss "
        "that is already non-finite at step 1 points at the base model's weights or the data."
    )


def _grad_norm(model) -> float:
    """The global 2-norm of the gradients (when the trainer did not hand over its own)."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def _last_checkpoint(output_dir: str | None) -> str | None:
    """The newest checkpoint this project wrote in `output_dir` (another tool's are not ours to
    offer), or None."""
    own = own_checkpoints(Path(output_dir)) if output_dir else []
    return str(own[-1]) if own else None
