"""Loss correctness: chunked head == full logits, packed == unpacked, 1x8 == 8x1 accumulation."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from sft_pipeline.trainer import DataCollatorForSFT, SFTConfig, SFTTrainer, best_fit_decreasing
from sft_pipeline.trainer.loss import logits_cross_entropy, supervised_cross_entropy
from tests.conftest import build_tiny_model

VOCAB = 300


def _rows(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token rows of varied length with a prompt (-100) and a supervised completion."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
        completion = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 10))]
        rows.append(
            {
                "input_ids": prompt + completion,
                "labels": [-100] * len(prompt) + completion,
            }
        )
    return rows


def _trainer(tmp_path, model, rows, **config) -> SFTTrainer:
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        **{"max_length": 64, **config},
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), tokenizer=_Tok()
    )


class _Tok:
    """Just enough of a tokenizer for pre-tokenized data."""

    pad_token_id = 0
    eos_token = "</s>"

    def save_pretrained(self, *_args, **_kwargs):
        return ()


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_and_grads_equal_full_logits(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 50, (3, 20))
    labels[torch.rand(3, 20) < 0.5] = -100

    chunked = supervised_cross_entropy(hidden, labels, weight, bias, chunk_size=7)
    grads_chunked = torch.autograd.grad(
        chunked[0], [hidden, weight] + ([bias] if with_bias else [])
    )
    logits = torch.nn.functional.linear(hidden, weight, bias)
    full = logits_cross_entropy(logits, labels)
    grads_full = torch.autograd.grad(full[0], [hidden, weight] + ([bias] if with_bias else []))

    assert torch.allclose(chunked[0], full[0].float(), atol=1e-5)
    assert chunked[1] == full[1] and chunked[2] == full[2]
    for a, b in zip(grads_chunked, grads_full, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_loss_without_supervised_tokens_is_zero_with_zero_grad():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    loss, correct, count = supervised_cross_entropy(hidden, torch.full((1, 4), -100), weight)
    loss.backward()
    assert loss.item() == 0 and count.item() == 0 and correct.item() == 0
    assert hidden.grad.abs().sum() == 0


def _per_token_nll(trainer, model, batch) -> torch.Tensor:
    """NLL of every position (unreduced) using the trainer's own attention inputs."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "document_ids")}
    model_inputs, _ = trainer._model_inputs(model, inputs, batch.get("document_ids"))
    logits = model(**model_inputs).logits.float()
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["shift_labels"], reduction="none", ignore_index=-100
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_per_token(tmp_path, attn):
    rows = _rows(12)
    model = build_tiny_model("llama", VOCAB, attn_implementation=attn)
    assert model.config.use_cache  # the trap: transformers' default would mix packed sequences
    model.eval()
    unpacked = _trainer(tmp_path, model, rows, packing=False)
    packed = _trainer(tmp_path, model, rows, packing=True)
    assert len(packed.train_dataset) < len(rows)

    collate = DataCollatorForSFT(pad_token_id=0)
    plain_batch = collate([unpacked.train_dataset[i] for i in range(len(rows))])
    packed_batch = collate([packed.train_dataset[i] for i in range(len(packed.train_dataset))])
    with torch.no_grad():
        nll_plain = _per_token_nll(unpacked, model, plain_batch)
        nll_packed = _per_token_nll(packed, model, packed_batch)
        loss_plain = unpacked.compute_loss(model, plain_batch)
        loss_packed = packed.compute_loss(model, packed_batch)
    assert abs(loss_plain.item() - loss_packed.item()) < 1e-4

    # Same supervised tokens, same NLL each, matched through the packing order.
    lengths = [len(r["input_ids"]) for r in unpacked.train_dataset]
    bins = best_fit_decreasing(lengths, 64)
    for packed_row, members in enumerate(bins):
        start = 0
        for index in members:
            n = lengths[index]
            mask = plain_batch["shift_labels"][index, : n - 1] != -100
            expect = nll_plain[index, : n - 1][mask]
            got = nll_packed[packed_row, start : start + n - 1][mask]
            assert torch.allclose(expect, got, atol=1e-4), (attn, index)
            start += n


class _GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _one_step(tmp_path, rows, batch_size, accumulation, max_tokens_per_forward=0, **config):
    model = build_tiny_model("llama", VOCAB, seed=1)
    capture = _GradCapture()
    trainer = _trainer(
        tmp_path,
        model,
        rows,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        max_tokens_per_forward=max_tokens_per_forward,
        **config,
    )
    trainer.add_callback(capture)
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, capture.grads


def assert_same_step(expected, got) -> None:
    """Two (loss, gradients) results of `_one_step` agree within 1e-5."""
    (loss_a, grads_a), (loss_b, grads_b) = expected, got
    assert abs(loss_a - loss_b) < 1e-5
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-5), name


def test_gradient_accumulation_matches_full_batch(tmp_path):
    rows = _rows(8, seed=3)
    assert_same_step(_one_step(tmp_path / "a", rows, 8, 1), _one_step(tmp_path / "b", rows, 1, 8))


def test_slicing_a_batch_into_forwards_keeps_loss_and_gradients(tmp_path):
    rows = _rows(8, seed=4)
    full = _one_step(tmp_path / "a", rows, 8, 1)
    # A 40-token budget runs the 8 rows (padded to ~22 tokens) one or two at a time.
    assert_same_step(full, _one_step(tmp_path / "b", rows, 8, 1, max_tokens_per_forward=40))


def test_padding_free_batches_keep_loss_and_gradients_without_padding(tmp_path):
    rows = _rows(8, seed=5)
    padded_step = _one_step(tmp_path / "a", rows, 8, 1)
    joined = _one_step(tmp_path / "b", rows, 8, 1, padding_free=True, max_length=None)
    assert_same_step(padded_step, joined)
    in_rows = dict(padding_free=True, max_length=None, padding_free_row_tokens=64)
    assert_same_step(padded_step, _one_step(tmp_path / "c", rows, 8, 1, **in_rows))

    padded = DataCollatorForSFT(pad_token_id=0)(rows)
    free = DataCollatorForSFT(pad_token_id=0, padding_free_capacity=64)(rows)
    assert free["input_ids"].numel() < padded["input_ids"].numel()
    assert int((free["document_ids"] > 0).sum()) == sum(len(r["input_ids"]) for r in rows)
    assert int((free["shift_labels"] != -100).sum()) == int((padded["shift_labels"] != -100).sum())
