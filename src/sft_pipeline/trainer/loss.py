"""Cross-entropy on supervised positions only, with the LM head applied chunk by chunk.

A causal LM's usual loss materializes fp32 logits for every position of the batch (batch x length
x vocab: 8 x 512 x 49k floats is 800 MB) and then throws most of them away, because prompts and
padding are not supervised. Here the final hidden states of the supervised positions are gathered
first, and the LM head, log-softmax, loss, gradient and accuracy are computed `chunk_size` rows at
a time inside one autograd function. The gradient of each chunk is computed in the forward pass
(softmax minus one-hot is all the backward needs), so no chunk's logits are kept for backward and
nothing is recomputed.

`causal_lm_loss` is the one entry point: the trainer's `compute_loss` and the evaluation's
held-out loss both call it, so training and evaluation score the same tokens the same way.

`token_weights` (the collator's `shift_loss_weights`, from a `loss_weights` column: turn weights)
multiplies each supervised token's NLL and its gradient; the sum is still divided by the count of
supervised tokens, so a turn of weight 2 counts as much as two such turns and one of weight 0.5
half. Without weights nothing changes: no weight tensor is built or multiplied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sft_pipeline.common.labels import IGNORE_INDEX

# Config fields that transform logits after the LM head: the chunked path would skip them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
DEFAULT_CHUNK_SIZE = 512


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP and PEFT wrappers (LoRA layers stay injected in it)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_prompt_learning(model: nn.Module) -> bool:
    """A PEFT prompt-learning model (prompt tuning, prefix tuning, p-tuning): its virtual tokens
    live in the PEFT wrapper's forward, which the chunked path would skip."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def chunkable_head(model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None] | None:
    """(decoder, lm_head weight, bias) when the chunked loss applies to `model`, else None."""
    if is_prompt_learning(model):
        return None
    base = unwrap(model)
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if getattr(base.config, "vision_config", None) is not None:
        # A vision-language model: the inner model merges image features into the text
        # embeddings before its language model runs (the language model alone takes no pixels).
        decoder = getattr(base, "model", None)
    if type(head) is not nn.Linear or decoder is None or decoder is base:
        return None
    if any(getattr(base.config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return decoder, head.weight, head.bias


def causal_lm_loss(
    model: nn.Module,
    model_inputs: dict[str, Any],
    shift_labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunked: bool = True,
    unflatten: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    dft: bool = False,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of NLL, correct argmax count, supervised token count) of one batch.

    The chunked LM head where it applies (`chunked` and a plain linear head), else the model's
    own logits (soft-capped or scaled heads, prompt learning). `unflatten` restores (batch,
    length, ...) when the forward ran on one flattened row. `dft`: each token's NLL weighted by
    its detached probability (Dynamic Fine-Tuning). `token_weights`: aligned with
    `shift_labels`, each token's loss weight (module doc).
    """
    head = chunkable_head(model) if chunked else None
    if head is not None:
        decoder, weight, bias = head
        hidden = decoder(**model_inputs).last_hidden_state
        return supervised_cross_entropy(
            unflatten(hidden),
            shift_labels,
            weight,
            bias,
            chunk_size,
            dft=dft,
            token_weights=token_weights,
        )
    logits = model_logits(model, model_inputs, unflatten, shift_labels.shape[1])
    return logits_cross_entropy(logits, shift_labels, dft=dft, token_weights=token_weights)


def model_logits(
    model: nn.Module,
    model_inputs: dict[str, Any],
    unflatten: Callable[[torch.Tensor], torch.Tensor],
    length: int,
) -> torch.Tensor:
    """The model's own logits for the `length` positions of the batch.

    Prompt tuning and p-tuning put their virtual tokens in front of the sequence, and the logits
    come back with them: those positions predict nothing of the data and are cut off.
    """
    logits = unflatten(model(**model_inputs).logits)
    return logits[:, -length:] if logits.shape[1] > length else logits


def shift(labels: torch.Tensor) -> torch.Tensor:
    """`shift_labels[b, i]` = the token position i predicts (labels moved left by one)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class _SupervisedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token NLLs of `hidden @ weight.T (+ bias)` against `targets`, chunked; each
    times its entry of `scale` where given (loss weights)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, chunk_size, compute_dtype, want_grads, dft, scale
    ):
        want_hidden, want_weight, want_bias = want_grads
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute_dtype)
            t = targets[start : start + chunk_size]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            nll = lse - logits.gather(1, t[:, None]).squeeze(1)
            # DFT weighs each token by its probability, a constant for the gradient; a loss
            # weight scales the token's NLL and gradient alike.
            weight_t = torch.exp(-nll) if dft else None
            if scale is not None:
                s = scale[start : start + chunk_size]
                weight_t = s if weight_t is None else weight_t * s
            loss_sum += (nll if weight_t is None else nll * weight_t).sum()
            correct += (logits.argmax(dim=-1) == t).sum()
            if not any(want_grads):
                continue
            # d(sum NLL)/d(logits) = softmax - one_hot, computed in place over the logits buffer.
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if weight_t is not None:
                dlogits.mul_(weight_t[:, None])
            d = dlogits.to(compute_dtype)
            if want_hidden:
                grad_hidden[start : start + chunk_size] = (d @ w).to(hidden.dtype)
            if want_weight:
                grad_weight += (d.t() @ h).float()
            if want_bias:
                grad_bias += dlogits.sum(dim=0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.want_grads = want_grads
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        grads = []
        for want, dtype in zip(ctx.want_grads, (None, *ctx.dtypes), strict=True):
            if not want:
                grads.append(None)
                continue
            g = next(saved) * grad_loss
            grads.append(g if dtype is None else g.to(dtype))
        return (*grads, None, None, None, None, None, None)


def supervised_cross_entropy(
    hidden: torch.Tensor,
    shift_labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    dft: bool = False,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sum of NLL, correct argmax count, supervised token count) for one batch.

    `hidden` is the backbone's final hidden state (batch, length, dim); `shift_labels[b, i]` is the
    token position i must predict, or -100. Divide the sum by the number of supervised tokens of
    the whole optimizer step to get the loss. `token_weights`: as in `causal_lm_loss`.
    """
    selected, targets, scale = _supervised_rows(hidden, shift_labels, token_weights)
    compute_dtype = weight.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    grad_on = torch.is_grad_enabled()
    want_grads = (
        grad_on and selected.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    with torch.autocast(hidden.device.type, enabled=False):
        loss_sum, correct = _SupervisedLinearCrossEntropy.apply(
            selected, weight, bias, targets, chunk_size, compute_dtype, want_grads, dft, scale
        )
    return loss_sum, correct, torch.tensor(targets.numel(), device=hidden.device)


def logits_cross_entropy(
    logits: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    dft: bool = False,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same triple from full logits: the fallback for heads the chunked path cannot take."""
    selected, targets, scale = _supervised_rows(logits, shift_labels, token_weights)
    selected = selected.float()
    if dft or scale is not None:
        nll = F.cross_entropy(selected, targets, reduction="none")
        factor = torch.exp(-nll.detach()) if dft else 1.0
        loss_sum = (nll * factor * (1.0 if scale is None else scale)).sum()
    else:
        loss_sum = F.cross_entropy(selected, targets, reduction="sum")
    correct = (selected.detach().argmax(dim=-1) == targets).sum()
    return loss_sum, correct, torch.tensor(targets.numel(), device=logits.device)


def _supervised_rows(
    values: torch.Tensor, shift_labels: torch.Tensor, token_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values at supervised positions as rows, their target tokens, their float32 loss weights
    or None), in position order."""
    flat_labels = shift_labels.reshape(-1)
    index = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    rows = values.reshape(-1, values.shape[-1]).index_select(0, index)
    scale = None
    if token_weights is not None:
        scale = token_weights.reshape(-1).to(torch.float32).index_select(0, index)
    return rows, flat_labels.index_select(0, index), scale
