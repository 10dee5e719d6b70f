"""Parity with TRL 1.16 on real data: same input_ids/labels, same first-batch loss.

Anchor: TRL's loss on records [172, 55, 225, 105, 47, 214, 183, 140] of the first 256
Alpaca records, SmolLM2-135M-Instruct, ChatML with SmolLM's default system prompt, completion =
output + <|im_end|>, max length 512, eval mode, fp32: 1.4874865.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import PROJECT_ROOT

ANCHOR_RECORDS = [172, 55, 225, 105, 47, 214, 183, 140]
ANCHOR_LOSS = 1.4874865


def _bench():
    spec = importlib.util.spec_from_file_location(
        "trainer_throughput", PROJECT_ROOT / "benchmarks" / "trainer_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.long
def test_labels_and_first_batch_loss_equal_trl(fixtures_dir, tmp_path):
    pytest.importorskip("trl", reason="TRL is a benchmark-only extra")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    from sft_pipeline.trainer import DataCollatorForSFT, SFTConfig, SFTTrainer

    bench = _bench()
    try:
        path = bench.model_dir()
    except Exception as exc:  # the package, or its conversion, is missing here
        pytest.skip(f"SmolLM2-135M-Instruct not available offline: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    rows = bench.alpaca_rows(256)
    common = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=512,
    )
    trl = TRLTrainer(
        model=model,
        args=TRLConfig(loss_type="nll", **common),
        train_dataset=Dataset.from_list(bench.prompt_completion(rows, tokenizer)),
        processing_class=tokenizer,
    )
    ours = SFTTrainer(
        model=model,
        args=SFTConfig(**common),
        train_dataset=Dataset.from_list(rows),  # raw Alpaca rows, through our own pipeline code
        processing_class=tokenizer,
    )
    assert len(ours.train_dataset) == len(trl.train_dataset) == 256
    for i in range(256):
        theirs, mine = trl.train_dataset[i], ours.train_dataset[i]
        assert mine["input_ids"] == theirs["input_ids"], i
        assert mine["labels"] == theirs["labels"], i

    model.eval()
    with torch.no_grad():
        trl_batch = trl.data_collator([trl.train_dataset[i] for i in ANCHOR_RECORDS])
        our_batch = DataCollatorForSFT(tokenizer.pad_token_id)(
            [ours.train_dataset[i] for i in ANCHOR_RECORDS]
        )
        assert trl_batch["input_ids"].shape == our_batch["input_ids"].shape == (8, 426)
        trl_loss = trl.compute_loss(model, dict(trl_batch)).item()
        our_loss = ours.compute_loss(model, dict(our_batch)).item()
    assert abs(our_loss - trl_loss) < 1e-5
    assert abs(our_loss - ANCHOR_LOSS) < 1e-5
