"""Tests for sft_pipeline.finetune: QLoRA / LoRA / full fine-tuning, optimizers, resume, families.

Every model here is a tiny random one (hidden 64, 2 layers) and every run a few dozen steps on a
small repetitive dataset, so a training test takes a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sft_pipeline.common.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    TrainingConfig,
    training_method,
)
from sft_pipeline.common.ownership import CHECKPOINT_MARKER
from sft_pipeline.finetune import workflow
from sft_pipeline.finetune.job import TrainJob, report_integrations
from sft_pipeline.finetune.launch import accelerate_command
from sft_pipeline.finetune.run_state import (
    FINGERPRINT_FILE,
    checkpoint_problem,
    prepare_output_dir,
)
from sft_pipeline.finetune.workflow import PARAMS_FILE
from sft_pipeline.model import device

QLORA = (QuantizationConfig(load_in_4bit=True), LoraConfig(r=8, alpha=16, dropout=0.0))
LORA = (QuantizationConfig(load_in_4bit=False), LoraConfig(r=8, alpha=16, dropout=0.0))
FULL = (QuantizationConfig(load_in_4bit=False), LoraConfig(enabled=False))
METHODS = {"qlora": QLORA, "lora": LORA, "full": FULL}

_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Convert the record to JSON: name Alice.", '{"name": "Alice"}'),
    ("Write a haiku about autumn.", "autumn leaves falling in the quiet wind"),
    ("Answer briefly.", "The quick brown fox jumps over the lazy dog."),
]


@pytest.fixture
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """Factory: a prepared base-model folder (manifest + model + tokenizer) of `family`."""
    from sft_pipeline.model.base_model import prepare_base_model

    def make(family: str = "llama") -> Path:
        target = tmp_path_factory.mktemp(f"base-{family}")
        # initializer_range 0.2 instead of 0.02: with the default, the frozen random lm_head
        # keeps all logits near 0, and no adapter can move the loss far from ln(vocab).
        # pad_token_id: phi3's default (32000) is outside the tiny vocabulary.
        source = tiny_model_dir(family, initializer_range=0.2, pad_token_id=0)
        config = ModelConfig(name_or_path=str(source))
        prepare_base_model(config).save_pretrained(target)
        return target

    return make


def tokenize_pairs(tokenizer, pairs, repeat: int):
    """ChatML rows with labels on the assistant answer and its end-of-turn token only."""
    from datasets import Dataset

    rows = []
    for i, (prompt, answer) in enumerate(pairs * repeat):
        head = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(f"{answer}<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = head_ids + tail_ids
        rows.append(
            {
                "record_id": f"{i:016x}",
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [-100] * len(head_ids) + tail_ids,
            }
        )
    return Dataset.from_list(rows)


@pytest.fixture(scope="session")
def tokens(tiny_tokenizer):
    """(train, eval) tokenized datasets."""
    return tokenize_pairs(tiny_tokenizer, _PAIRS, 4), tokenize_pairs(tiny_tokenizer, _PAIRS, 1)


def training_config(tmp_path: Path, **overrides) -> TrainingConfig:
    values = dict(
        output_dir=str(tmp_path / "checkpoints"),
        max_steps=20,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        logging_steps=1,
        save_steps=100,
        packing=False,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def train(base, train_tokens, eval_tokens, quant, lora, training, *, callbacks=()):
    """The library side of `train_adapter` on a job built from these pieces."""
    job = TrainJob(
        base_model_dir=Path(base),
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        quantization=quant,
        lora=lora,
        training=training,
        max_length=max(len(ids) for ds in (train_tokens, eval_tokens) for ids in ds["input_ids"]),
    )
    return workflow.train(job, callbacks=callbacks)


def train_losses(history):
    return [h["loss"] for h in history if h.get("loss") is not None]


# --------------------------------------------------------------------------- configuration


def test_method_mapping():
    assert training_method(*QLORA) == "qlora"
    assert training_method(*LORA) == "lora"
    assert training_method(*FULL) == "full"


def test_full_fine_tuning_of_a_4bit_base_is_a_clear_config_error(tmp_path, tokens):
    with pytest.raises(ConfigError, match=r"lora\.enabled: false.*load_in_4bit: true"):
        train(
            tmp_path / "never-read",
            *tokens,
            QuantizationConfig(load_in_4bit=True),
            LoraConfig(enabled=False),
            training_config(tmp_path),
        )
    # Failing before any work: nothing was created.
    assert not (tmp_path / "checkpoints").exists()


def test_padding_free_training_joins_batches_into_rows_of_the_tokenization_length(tmp_path):
    from sft_pipeline.finetune.job import build_sft_config

    def config(**training):
        job = TrainJob(Path("."), None, None, *LORA, training_config(tmp_path, **training), 96)
        return build_sft_config(job, "fp32")

    free = config(padding_free=True)
    # Rows come truncated from the tokenization node: the trainer joins each batch into rows
    # of at most 96 tokens instead of truncating a joined row.
    assert (free.max_length, free.padding_free_row_tokens) == (None, 96)
    assert (config().max_length, config().padding_free_row_tokens) == (96, None)
    packed = config(padding_free=True, packing=True)
    assert (packed.max_length, packed.padding_free_row_tokens) == (96, 96)


def test_bad_training_values_name_the_key():
    from sft_pipeline.common.config import parse_section

    with pytest.raises(ConfigError, match=r"training\.optim"):
        parse_section(TrainingConfig, {"optim": "sgd"}, "training")


def test_empty_training_data_is_a_user_error_naming_the_parameter(tokens, tmp_path):
    from sft_pipeline.common.errors import NoTrainingRowsError, UserError
    from sft_pipeline.finetune.workflow import train

    job = TrainJob(
        base_model_dir=tmp_path / "never-loaded",
        train_tokens=tokens[0].select([]),
        eval_tokens=tokens[1],
        quantization=QuantizationConfig(load_in_4bit=False),
        lora=LoraConfig(),
        training=TrainingConfig(output_dir=str(tmp_path / "out")),
        max_length=64,
    )
    with pytest.raises(NoTrainingRowsError, match=r"tokenization\.max_seq_length") as exc:
        train(job)
    assert isinstance(exc.value, UserError)
    assert not (tmp_path / "out").exists()


def test_report_to_keeps_only_installed_integrations(caplog):
    from transformers.integrations import is_tensorboard_available

    assert report_integrations("none") == ["none"]
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.finetune.job"):
        kept = report_integrations(["tensorboard"])
    if is_tensorboard_available():
        assert kept == ["tensorboard"]
    else:
        assert kept == ["none"]
        assert "tensorboard is not installed" in caplog.text


def test_accelerate_command_runs_this_module():
    command = accelerate_command(Path("/x/.launch"), 4)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[-3:] == ["--module", "sft_pipeline.finetune.worker", "/x/.launch"]


# --------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_each_method_lowers_the_training_loss(method, base_model_dir, tokens, tmp_path):
    quant, lora = METHODS[method]
    artifact, history, summary = train(
        base_model_dir(), *tokens, quant, lora, training_config(tmp_path)
    )
    losses = train_losses(history)
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0], losses

    assert summary["method"] == method
    # `auto` on a CPU with native bf16 times real steps in both precisions: either may win,
    # and the summary reports the one that ran. Without native bf16 it is always fp32.
    assert summary["precision"] == "fp32" or (
        summary["precision"] == "bf16" and device.cpu_has_native_bf16()
    )
    assert summary["global_step"] == 20
    assert summary["eval_loss"] is not None
    assert summary["resumed_from"] is None
    assert summary["tokens_seen"] > 0
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    if method == "full":
        assert summary["trainable_params"] == summary["total_params"]
    else:
        assert summary["trainable_params"] < summary["total_params"] / 2
    assert any("grad_norm" in h and "learning_rate" in h for h in history)

    out = tmp_path / "adapter"
    artifact.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    if method == "full":
        assert {"config.json", "model.safetensors"} <= names
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert "tokenizer.json" in names
    assert not any(n.endswith(".bin") for n in names)
    params = json.loads((out / PARAMS_FILE).read_text())
    assert params["method"] == method
    assert params["training"]["learning_rate"] == 2e-2


@pytest.mark.parametrize(
    "optim", ["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor"]
)
def test_each_optimizer_lowers_the_loss(optim, base_model_dir, tokens, tmp_path):
    config = training_config(tmp_path, optim=optim, max_steps=6)
    _, history, summary = train(base_model_dir(), *tokens, *QLORA, config)
    losses = train_losses(history)
    assert summary["optimizer"] == optim
    assert summary["global_step"] == 6
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("family", ["mistral", "gemma", "phi3", "qwen2"])
def test_other_families_train(family, base_model_dir, tokens, tmp_path):
    config = training_config(tmp_path, max_steps=12)
    _, history, summary = train(base_model_dir(family), *tokens, *QLORA, config)
    losses = train_losses(history)
    assert summary["global_step"] == 12
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_packing_and_gradient_checkpointing(base_model_dir, tokens, tmp_path):
    config = training_config(tmp_path, max_steps=10, packing=True, gradient_checkpointing=True)
    _, history, summary = train(base_model_dir(), *tokens, *QLORA, config)
    assert summary["global_step"] == 10
    assert train_losses(history)[-1] < train_losses(history)[0]


def test_eval_steps_and_an_impossible_precision(base_model_dir, tokens, tmp_path):
    import torch

    # fp16 on a CPU: the trainer falls back (with a warning) and the base is loaded to match.
    config = training_config(tmp_path, max_steps=6, eval_steps=2, precision="fp16")
    _, history, summary = train(base_model_dir(), *tokens, *LORA, config)
    if not torch.cuda.is_available():
        assert summary["precision"] in ("bf16", "fp32")
    evaluated_at = [h["step"] for h in history if h["eval_loss"] is not None]
    assert evaluated_at == [2, 4, 6]  # no second evaluation at the end


# --------------------------------------------------------------------------- resume


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(f"simulated interruption at step {step}")

    return CrashAt()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "full"])
def test_rerun_after_interruption_resumes_from_last_checkpoint(
    method, base_model_dir, tokens, tmp_path
):
    import torch
    from safetensors.torch import load_file

    base = base_model_dir()
    quant, lora = METHODS[method]
    # packing: the pipeline's default; it also gives the seedable random sampler, so the resumed
    # run must see exactly the batches an uninterrupted one does.
    config = training_config(tmp_path, max_steps=10, save_steps=3, save_total_limit=2, packing=True)
    with pytest.raises(Crash):
        train(base, *tokens, quant, lora, config, callbacks=[crash_at(7)])
    checkpoints = sorted(p.name for p in Path(config.output_dir).glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]

    artifact, history, summary = train(base, *tokens, quant, lora, config)
    assert summary["resumed_from"].endswith("checkpoint-6")
    assert summary["global_step"] == 10
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == list(range(1, 11))  # logs of steps 1-6 come back from the checkpoint

    # The resumed run ends where an uninterrupted one does, in the precision the run trained in
    # (`auto` times a step in each precision, and a busy machine may time them otherwise).
    straight = training_config(
        tmp_path / "straight",
        max_steps=10,
        save_steps=3,
        packing=True,
        precision=summary["precision"],
    )
    artifact2, history2, _ = train(base, *tokens, quant, lora, straight)
    assert train_losses(history) == pytest.approx(train_losses(history2), rel=1e-4)
    for counter in ("num_tokens", "supervised_tokens"):  # running totals go on after a resume
        assert [h[counter] for h in history] == [h[counter] for h in history2]
    artifact.save_pretrained(tmp_path / "a")
    artifact2.save_pretrained(tmp_path / "b")
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    resumed, uninterrupted = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in resumed.items():
        torch.testing.assert_close(value, uninterrupted[key], rtol=1e-4, atol=1e-5)


def test_checkpoints_of_a_different_run_are_not_resumed(base_model_dir, tokens, tmp_path, caplog):
    base = base_model_dir()
    config = training_config(tmp_path, max_steps=4, save_steps=2)
    train(base, *tokens, *LORA, config)
    changed = config.model_copy(update={"learning_rate": 1e-3})
    with caplog.at_level(logging.INFO, logger="sft_pipeline.finetune.run_state"):
        _, history, summary = train(base, *tokens, *LORA, changed)
    assert summary["resumed_from"] is None
    assert "made for a different run: training.learning_rate 0.02 -> 0.001" in caplog.text
    assert history[0]["step"] == 1
    # The first run's work is still on disk, whole, and says which run it was.
    aside = Path(config.output_dir) / "previous_run"
    assert [p.name for p in sorted(aside.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint_problem(aside / "checkpoint-4") is None
    assert json.loads((aside / FINGERPRINT_FILE).read_text())["params"]["training"][
        "learning_rate"
    ] == pytest.approx(2e-2)


def test_a_changed_library_or_code_is_named_and_only_the_last_set_aside_is_kept(tmp_path, caplog):
    output_dir = tmp_path / "ckpt"
    params = {
        "code": {"sources": "a", "transformers": "5.24.0"},
        "train_data": "x",
        "training": {"learning_rate": 1e-4},
    }
    runs = [
        {"fingerprint": "one", "params": params},
        {"fingerprint": "two", "params": {**params, "code": {"sources": "a", "transformers": "6"}}},
        {
            "fingerprint": "three",
            "params": {**params, "code": {"sources": "b", "transformers": "6"}},
        },
    ]
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.finetune.run_state"):
        for step, run in enumerate(runs, start=1):
            (output_dir / FINGERPRINT_FILE).parent.mkdir(exist_ok=True)
            assert prepare_output_dir(output_dir, run, "auto") is None
            write_checkpoint(output_dir, step * 10)
    assert "transformers 5.24.0 -> 6" in caplog.text
    assert "the training code" in caplog.text
    aside = output_dir / "previous_run"
    # The set of run two (checkpoint-20); run one's was dropped when run three started.
    assert [p.name for p in aside.glob("checkpoint-*")] == ["checkpoint-20"]
    assert json.loads((aside / FINGERPRINT_FILE).read_text())["fingerprint"] == "two"
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-30"]


def write_checkpoint(output_dir: Path, step: int) -> Path:
    """A complete checkpoint in the trainer's layout (tiny tensors), for resume-protocol tests."""
    import torch
    from safetensors.torch import save_file

    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_MARKER).write_text(json.dumps({"written_by": "sft-pipeline"}))
    save_file({"w": torch.arange(64, dtype=torch.float32)}, folder / "adapter_model.safetensors")
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.zeros(4, dtype=torch.uint8)}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_parameters_that_do_not_change_weights_keep_checkpoints(tmp_path):
    output_dir = tmp_path / "ckpt"
    write_checkpoint(output_dir, 2)
    # Interrupted while saving: the marker (written first) but no trainer_state.json.
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / CHECKPOINT_MARKER).write_text("{}")
    fingerprint = {"fingerprint": "abc", "params": {}}
    (output_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))

    assert prepare_output_dir(output_dir, fingerprint, "auto") == output_dir / "checkpoint-2"
    assert not (output_dir / "checkpoint-4").exists()
    assert prepare_output_dir(output_dir, fingerprint, "never") is None
    assert not (output_dir / "checkpoint-2").exists()
    assert (output_dir / "previous_run" / "checkpoint-2").is_dir()  # set aside, not deleted


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is unreadable"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "step 4"),
        (lambda c: (c / "adapter_model.safetensors").unlink(), "no weights"),
        (lambda c: _truncate(c / "adapter_model.safetensors"), "is truncated"),
        (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
        (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
        (lambda c: (c / "rng_state.pth").unlink(), "no rng_state"),
    ],
)
def test_a_corrupt_last_checkpoint_is_skipped_for_the_one_before(damage, reason, tmp_path, caplog):
    output_dir = tmp_path / "ckpt"
    write_checkpoint(output_dir, 2)
    damage(write_checkpoint(output_dir, 4))
    fingerprint = {"fingerprint": "abc", "params": {}}
    (output_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))

    with caplog.at_level(logging.WARNING, logger="sft_pipeline.finetune.run_state"):
        resume_from = prepare_output_dir(output_dir, fingerprint, "auto")
    assert resume_from == output_dir / "checkpoint-2"
    assert f"skipping incomplete checkpoint {output_dir / 'checkpoint-4'}: " in caplog.text
    assert reason in caplog.text
    assert not (output_dir / "checkpoint-4").exists()


def test_a_truncated_fingerprint_or_a_killed_write_does_not_break_the_next_run(tmp_path, caplog):
    output_dir = tmp_path / "ckpt"
    write_checkpoint(output_dir, 2)
    fingerprint = {"fingerprint": "abc", "params": {"lr": 1}}
    (output_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint)[:10])
    leftover = output_dir / f".{FINGERPRINT_FILE}.sft-pipeline-tmp-x1y2"
    leftover.write_text("{")

    with caplog.at_level(logging.WARNING, logger="sft_pipeline.finetune.run_state"):
        assert prepare_output_dir(output_dir, fingerprint, "auto") is None
    assert "unreadable" in caplog.text
    assert not leftover.exists()
    assert not (output_dir / "checkpoint-2").exists()  # of an unknown run: not resumed
    assert json.loads((output_dir / FINGERPRINT_FILE).read_text()) == fingerprint


def test_checkpoints_not_written_by_the_trainer_are_never_resumed_or_removed(tmp_path, caplog):
    output_dir = tmp_path / "ckpt"
    write_checkpoint(output_dir, 2)
    theirs = write_checkpoint(output_dir, 6)  # complete, but another tool's: no marker
    (theirs / CHECKPOINT_MARKER).unlink()
    fingerprint = {"fingerprint": "abc", "params": {}}
    (output_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))

    with caplog.at_level(logging.WARNING, logger="sft_pipeline.finetune.run_state"):
        assert prepare_output_dir(output_dir, fingerprint, "auto") == output_dir / "checkpoint-2"
        assert prepare_output_dir(output_dir, {"fingerprint": "other"}, "auto") is None
    assert not (output_dir / "checkpoint-2").exists()  # ours, of another run: removed
    assert theirs.is_dir() and (theirs / "trainer_state.json").is_file()
    assert f"leaving {theirs} alone: it was not written by this project's trainer" in caplog.text
    assert CHECKPOINT_MARKER in caplog.text


def test_the_trainer_marks_its_checkpoints_and_rotates_only_its_own(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    from sft_pipeline.trainer import SFTConfig, SFTTrainer

    output_dir = tmp_path / "out"
    theirs = output_dir / "checkpoint-1"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("another tool's")
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=6,
        save_steps=2,
        save_total_limit=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=str(tiny_model_dir("llama")),
        args=args,
        train_dataset=tokenize_pairs(tiny_tokenizer, _PAIRS, 2),
        processing_class=tiny_tokenizer,
    )
    trainer.train()
    names = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    assert names == ["checkpoint-1", "checkpoint-6"]  # ours rotated down to 1; theirs kept
    marker = json.loads((output_dir / "checkpoint-6" / CHECKPOINT_MARKER).read_text())
    assert marker == {"written_by": "sft-pipeline", "step": 6, "precision": "fp32"}
    assert (theirs / "notes.txt").read_text() == "another tool's"


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    import torch

    from sft_pipeline.trainer.sampling import SeededLengthGroupedSampler

    lengths = [3, 9, 4, 12, 5, 7, 8, 2, 11, 6, 10, 1] * 2
    sampler = SeededLengthGroupedSampler(4, lengths, seed=42)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(sampler) == first
    assert sorted(first) == list(range(len(lengths)))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    other = SeededLengthGroupedSampler(4, lengths, seed=42)
    other.set_epoch(1)
    assert list(other) == second  # a resumed run (a new sampler) replays epoch 1


def test_auto_quantization_is_qlora_on_cuda_and_full_precision_on_cpu(monkeypatch):
    import torch

    def decided(quant, lora):
        job = TrainJob(Path("."), None, None, quant, lora, TrainingConfig(), 8)
        return job.for_this_device().quantization.load_in_4bit

    auto, lora = QuantizationConfig(), LoraConfig()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert decided(auto, lora) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decided(auto, lora) is True
    # Full fine-tuning never loads 4-bit weights, and an explicit choice is kept.
    assert decided(auto, LoraConfig(enabled=False)) is False
    assert decided(QLORA[0], lora) is True


def test_a_resumed_run_trains_in_the_precision_its_checkpoint_ran_in(tmp_path):
    from types import SimpleNamespace

    from sft_pipeline.finetune import model_setup

    # A run resumed on another machine keeps the numerics it started with.
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    marker = {"written_by": "sft-pipeline", "step": 4, "precision": "bf16"}
    (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    job = SimpleNamespace(training=SimpleNamespace(precision="fp32"))
    assert model_setup.run_precision(job, checkpoint) == "bf16"
    assert model_setup.run_precision(job, None) == "fp32"  # a fresh run decides for itself


@pytest.mark.parametrize("cpu", ["native-bf16", "emulated-bf16"])
def test_the_same_command_trains_in_the_same_precision_twice_on_a_busy_machine(
    cpu, base_model_dir, tokens, tmp_path, monkeypatch
):
    import subprocess
    import sys

    from sft_pipeline.model import device

    # Both branches of the CPU rule, whatever this CPU reports.
    flags = "fpu avx2 avx512f avx512_bf16" if cpu == "native-bf16" else "fpu avx2"
    monkeypatch.setattr(device, "_cpu_flags", lambda cpuinfo=None: set(flags.split()))
    expected = "bf16" if cpu == "native-bf16" else "fp32"
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)
    ]  # both cores loaded while the runs decide
    try:
        summaries = []
        for run in range(2):
            config = training_config(tmp_path / str(run), max_steps=1, precision="auto")
            summaries.append(train(base_model_dir(), *tokens, *LORA, config)[2])
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert [s["precision"] for s in summaries] == [expected, expected]
    basis = summaries[0]["precision_decided_by"]
    assert basis.startswith("CPU flags") and ("avx512_bf16" in basis) is (expected == "bf16")
