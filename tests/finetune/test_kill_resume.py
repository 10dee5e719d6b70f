"""Kill-safe training: a training process killed with SIGKILL (after a checkpoint, in the middle of
writing one) and run again ends with the adapter of a run that was never interrupted.

Each run is a real process (`train_process.py`) on a tiny random model; the test waits for the
file the process creates where it stops, so the kill lands at the intended moment however slow
the machine is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.finetune.test_finetune import _PAIRS, tokenize_pairs

TRAIN_PROCESS = Path(__file__).with_name("train_process.py")
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}


@pytest.fixture
def job_files(tiny_model_dir, tiny_tokenizer, tmp_path):
    """(base model folder, train tokens folder, eval tokens folder) on disk for the processes."""
    from sft_pipeline.common.config import ModelConfig
    from sft_pipeline.model.base_model import prepare_base_model

    source = tiny_model_dir("llama", initializer_range=0.2, pad_token_id=0)
    base = tmp_path / "base"
    prepare_base_model(ModelConfig(name_or_path=str(source))).save_pretrained(base)
    train, evaluation = tmp_path / "train_tokens", tmp_path / "eval_tokens"
    tokenize_pairs(tiny_tokenizer, _PAIRS, 4).save_to_disk(str(train))
    tokenize_pairs(tiny_tokenizer, _PAIRS, 1).save_to_disk(str(evaluation))
    # Every process of a test runs this copy of the package: the run fingerprint covers the
    # training code, and an edit to the working tree mid-test would (rightly) start over.
    code = tmp_path / "code"
    shutil.copytree(
        PROJECT_ROOT / "src" / "sft_pipeline",
        code / "sft_pipeline",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return base, train, evaluation, code


def training(output_dir: Path, **overrides) -> dict:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="cosine",
        warmup_ratio=0.0,
        logging_steps=1,
        save_steps=2,
        save_total_limit=2,
        precision="fp32",
    )
    values.update(overrides)
    return values


class TrainRun:
    """Start a training process with `spec`; `kill_when_stopped` / `finish` end it."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        job_files,
        training_values: dict,
        env: dict[str, str] | None = None,
        **extra,
    ) -> None:
        base, train, evaluation, code = job_files
        self.out = tmp / f"out-{name}"
        self.marker = tmp / f"{name}.stopped"
        self.log = tmp / f"{name}.log"
        spec = {
            "base_model_dir": str(base),
            "train_tokens": str(train),
            "eval_tokens": str(evaluation),
            "quantization": {"load_in_4bit": False},
            "lora": LORA,
            "training": training_values,
            "out": str(self.out),
            "marker": str(self.marker),
            **extra,
        }
        spec_path = tmp / f"{name}.json"
        spec_path.write_text(json.dumps(spec))
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(code),
            **(env or {}),
        }
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(TRAIN_PROCESS), str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_when_stopped(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before its stop point:\n"
                    + self.output()[-4000:]
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("never reached its stop point:\n" + self.output()[-4000:])
            time.sleep(0.05)
        self.proc.kill()  # SIGKILL
        self.proc.wait()

    def finish(self, timeout: float = 600) -> dict:
        code = self.proc.wait(timeout=timeout)
        assert code == 0, self.output()[-4000:]
        return json.loads((self.out / "summary.json").read_text())

    def adapter(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.out / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def checkpoint_names(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


@pytest.mark.slow
def test_killed_after_a_checkpoint_and_during_a_save_ends_with_the_uninterrupted_adapter(
    job_files, tmp_path
):
    # Packed batches (the pipeline's default), 8 steps, a checkpoint every 2.
    straight = TrainRun(tmp_path, "straight", job_files, training(tmp_path / "a", max_steps=8))
    straight.finish()

    killed_dir = tmp_path / "b"
    values = training(killed_dir, max_steps=8)
    # Killed right after its second checkpoint...
    TrainRun(tmp_path, "kill1", job_files, values, stop_after_save=4).kill_when_stopped()
    assert checkpoint_names(killed_dir) == ["checkpoint-2", "checkpoint-4"]
    # ...then, resumed, killed while writing the next one: trainer_state.json half written.
    TrainRun(tmp_path, "kill2", job_files, values, stop_in_save=6).kill_when_stopped()
    state = (killed_dir / "checkpoint-6" / "trainer_state.json").read_text()
    with pytest.raises(ValueError):
        json.loads(state)

    resumed = TrainRun(tmp_path, "resumed", job_files, values)
    summary = resumed.finish()
    assert str(summary["resumed_from"]).endswith("checkpoint-4"), resumed.output()[-4000:]
    assert summary["global_step"] == 8
    assert "skipping incomplete checkpoint" in resumed.output()
    assert "checkpoint-6" in resumed.output()
    difference = max_difference(resumed.adapter(), straight.adapter())
    print(f"max |resumed - uninterrupted| adapter difference: {difference:.3g}")
    assert difference <= 1e-6
    # Checkpoints hold no pickled training arguments.
    for checkpoint in killed_dir.glob("checkpoint-*"):
        assert (checkpoint / "training_args.json").is_file()
        assert not (checkpoint / "training_args.bin").exists()


@pytest.mark.slow
def test_length_grouped_batches_resume_exactly_when_killed_in_the_second_epoch(job_files, tmp_path):
    # No packing: the length-grouped sampler; 16 rows in batches of 4 -> 4 steps per epoch.
    def values(folder):
        return training(folder, num_train_epochs=2, max_steps=-1, packing=False)

    straight = TrainRun(tmp_path, "straight", job_files, values(tmp_path / "a"))
    assert straight.finish()["global_step"] == 8

    TrainRun(
        tmp_path, "kill", job_files, values(tmp_path / "b"), stop_after_save=6
    ).kill_when_stopped()
    resumed = TrainRun(tmp_path, "resumed", job_files, values(tmp_path / "b"))
    summary = resumed.finish()
    assert str(summary["resumed_from"]).endswith("checkpoint-6"), resumed.output()[
        -4000:
    ]  # two steps into epoch 2
    difference = max_difference(resumed.adapter(), straight.adapter())
    print(f"max |resumed - uninterrupted| adapter difference: {difference:.3g}")
    assert difference <= 1e-6
