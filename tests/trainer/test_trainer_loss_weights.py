"""Turn weights in training: a `loss_weights` column scales each supervised token's loss, the
mean is still over the supervised tokens, and the weights stay with their tokens through
packing, padding-free batches and the collator."""

from __future__ import annotations

import pytest
import torch

from sft_pipeline.trainer import DataCollatorForSFT
from sft_pipeline.trainer.loss import logits_cross_entropy, supervised_cross_entropy
from sft_pipeline.trainer.packing import pack_by_strategy
from tests.conftest import build_tiny_model
from tests.trainer.test_trainer_loss import VOCAB, _one_step, _rows, _trainer

# Turn weights as data carries them: 0.5, 2 and the default 1.
TURN_WEIGHTS = (0.5, 2.0, 1.0)


def _weighted_rows(n: int, seed: int) -> list[dict[str, list]]:
    """`_rows` with a `loss_weights` column: each row's supervised tokens at its turn weight."""
    rows = _rows(n, seed=seed)
    for k, row in enumerate(rows):
        weight = TURN_WEIGHTS[k % len(TURN_WEIGHTS)]
        row["loss_weights"] = [0.0 if lab == -100 else weight for lab in row["labels"]]
    return rows


def _hand_weighted_loss(model, rows) -> float:
    """sum(weight * NLL) over every supervised token / the number of supervised tokens, one row
    at a time through the model's own logits and a plain cross-entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            targets = torch.tensor(row["labels"][1:])
            weights = torch.tensor(row["loss_weights"][1:], dtype=torch.float64)
            keep = targets != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
            total += float((nll * weights[keep]).sum())
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize(
    "config",
    [{"packing": False}, {"packing": True}, {"padding_free": True, "max_length": None}],
    ids=["padded", "packed", "padding_free"],
)
def test_one_training_step_loss_is_the_hand_computed_weighted_loss(tmp_path, config):
    rows = _weighted_rows(6, seed=7)
    expected = _hand_weighted_loss(build_tiny_model("llama", VOCAB, seed=1).eval(), rows)
    loss, _grads = _one_step(tmp_path, rows, 6, 1, **config)
    assert abs(loss - expected) < 1e-5
    # The same rows without weights give another loss: the weights were applied.
    plain = [{k: v for k, v in row.items() if k != "loss_weights"} for row in rows]
    assert abs(_one_step(tmp_path / "plain", plain, 6, 1, **config)[0] - loss) > 1e-3


@pytest.mark.parametrize("dft", [False, True])
def test_weighted_chunked_loss_and_grads_equal_weighted_full_logits(dft):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 20), generator=generator)
    labels[:, :5] = -100
    weights = torch.rand(3, 20, generator=generator, dtype=torch.float64) * 3
    hidden, head = (
        torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
        for shape in ((3, 20, 16), (50, 16))
    )
    options = {"dft": dft, "token_weights": weights}
    chunked = supervised_cross_entropy(hidden, labels, head, chunk_size=7, **options)
    full = logits_cross_entropy(hidden @ head.T, labels, **options)
    assert torch.allclose(chunked[0], full[0].float(), atol=1e-5)
    assert chunked[1] == full[1] and chunked[2] == full[2] == 45
    grads = [torch.autograd.grad(loss[0], [hidden, head]) for loss in (chunked, full)]
    assert all(torch.allclose(a, b, atol=3e-5) for a, b in zip(*grads, strict=True))
    # Each supervised token's NLL times its weight (and, for DFT, its probability).
    keep = labels != -100
    nll = torch.nn.functional.cross_entropy((hidden @ head.T)[keep], labels[keep], reduction="none")
    expected = nll * weights[keep] * (torch.exp(-nll) if dft else 1.0)
    assert full[0].item() == pytest.approx(expected.sum().item(), rel=1e-6)


def _weight_of(token: int) -> float:
    return 0.25 * (token % 7 + 1)


def _aligned(ids, labels, weights) -> None:
    """Every supervised position carries its own token's weight, every other one 0."""
    for i, lab, w in zip(ids, labels, weights, strict=True):
        assert w == (0.0 if lab == -100 else _weight_of(lab)), (i, lab, w)
        assert lab in (-100, i)


@pytest.mark.parametrize(("strategy", "capacity"), [("bfd", 24), ("bfd_split", 8), ("wrapped", 16)])
def test_packing_keeps_each_weight_with_its_token(strategy, capacity):
    rows = _rows(12, seed=8)
    ids = [row["input_ids"] for row in rows]
    labels = [row["labels"] for row in rows]
    weights = [[0.0 if lab == -100 else _weight_of(lab) for lab in row] for row in labels]
    packed = pack_by_strategy(ids, labels, capacity, strategy, weights)
    assert len(packed["loss_weights"]) == len(packed["input_ids"])
    for row in zip(packed["input_ids"], packed["labels"], packed["loss_weights"], strict=True):
        _aligned(*row)
    # Packing sets each sequence's first label to -100: its weight goes to 0 with it.
    assert sum(w > 0 for row in packed["loss_weights"] for w in row) == sum(
        lab != -100 for row in packed["labels"] for lab in row
    )


@pytest.mark.parametrize("capacity", [None, 64])
def test_the_collator_aligns_weights_with_what_each_position_predicts(capacity):
    rows = _rows(8, seed=9)
    for row in rows:
        row["loss_weights"] = [0.0 if lab == -100 else _weight_of(lab) for lab in row["labels"]]
    batch = DataCollatorForSFT(pad_token_id=0, padding_free_capacity=capacity)(rows)
    shift_labels, shift_weights = batch["shift_labels"], batch["shift_loss_weights"]
    assert shift_weights.shape == shift_labels.shape and shift_weights.dtype == torch.float32
    for labels, weights in zip(shift_labels.tolist(), shift_weights.tolist(), strict=True):
        for lab, w in zip(labels, weights, strict=True):
            assert w == (0.0 if lab == -100 else _weight_of(lab))
    plain = DataCollatorForSFT(pad_token_id=0)(
        [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
    )
    assert "shift_loss_weights" not in plain


@pytest.mark.parametrize(
    ("weights", "found"),
    [([1.0, -1.0], "-1.0"), ([1.0, float("nan")], "nan"), ([1.0], "1 values for")],
)
def test_a_loss_weights_column_that_is_not_one_finite_weight_per_token_is_refused(
    tmp_path, weights, found
):
    rows = [{"input_ids": [5, 6], "labels": [-100, 6], "loss_weights": weights}]
    with pytest.raises(ValueError) as caught:
        _trainer(tmp_path, build_tiny_model("llama", VOCAB), rows)
    message = str(caught.value)
    assert message.startswith("train_dataset row 1: loss_weights has ")
    assert found in message and "expected one finite number >= 0 per token" in message


@pytest.mark.parametrize("packing", [False, True])
def test_a_streamed_dataset_keeps_each_weight_with_its_token(tmp_path, packing):
    from datasets import Dataset

    from sft_pipeline.trainer import SFTConfig
    from sft_pipeline.trainer.data_prep import prepare_dataset

    rows = _rows(10, seed=10)
    for row in rows:
        row["loss_weights"] = [0.0 if lab == -100 else _weight_of(lab) for lab in row["labels"]]
    args = SFTConfig(output_dir=str(tmp_path), max_length=24, report_to="none", use_cpu=True)
    stream = Dataset.from_list(rows).to_iterable_dataset()
    prepared = list(prepare_dataset(stream, None, args, None, "train_dataset", packing))
    assert sum(len(r["input_ids"]) for r in prepared) == sum(len(r["input_ids"]) for r in rows)
    for row in prepared:
        _aligned(row["input_ids"], row["labels"], row["loss_weights"])
