"""Training in several real processes (`accelerate launch`, gloo on a CPU) equals one process.

Two processes with a per-device batch of 2 and one process with a batch of 4 draw the same rows
per optimizer step (accelerate gives rank r the r-th slice of each global batch) and normalize
the loss by the same supervised-token count, so losses and adapters must agree to float noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_pipeline.finetune.launch import accelerate_command
from tests.conftest import save_tiny_model

_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Convert the record to JSON: name Alice.", '{"name": "Alice"}'),
    ("Write a haiku about autumn.", "autumn leaves falling in the quiet wind"),
    ("Answer briefly.", "The quick brown fox jumps over the lazy dog."),
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from sft_pipeline.common.config import ModelConfig
    from sft_pipeline.model.base_model import prepare_base_model

    source = save_tiny_model(
        tmp_path_factory.mktemp("tiny"), "llama", initializer_range=0.2, pad_token_id=0
    )
    target = tmp_path_factory.mktemp("base")
    prepare_base_model(ModelConfig(name_or_path=str(source))).save_pretrained(target)
    return target


def tokenized(tokenizer, repeat: int):
    from datasets import Dataset

    rows = []
    for i, (prompt, answer) in enumerate(_PAIRS * repeat):
        head = tokenizer(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
        tail = tokenizer(f"{answer} {i}<|im_end|>")["input_ids"]
        ids = head["input_ids"] + tail
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [-100] * len(head["input_ids"]) + tail,
            }
        )
    return Dataset.from_list(rows)


# The training section every run here shares; fp32 pinned, so that machines with other CPU
# flags would train alike too.
TRAINING = {
    "max_steps": 4,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "warmup_ratio": 0.0,
    "logging_steps": 1,
    "save_steps": 100,
    "per_device_eval_batch_size": 2,
    "precision": "fp32",
}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def run_training(base_dir: Path, out: Path, **training):
    """`train_adapter`, the pipeline's training node, on a small LoRA job."""
    from sft_pipeline.model.loading import load_tokenizer
    from sft_pipeline.pipelines.sft.nodes import train_adapter

    tokenizer = load_tokenizer(base_dir)
    params = {"output_dir": str(out / "checkpoints"), **TRAINING, **training}
    artifact, history, summary = train_adapter(
        base_dir,
        tokenized(tokenizer, 4),
        tokenized(tokenizer, 1),
        {"load_in_4bit": False},
        LORA,
        params,
        # 16 rows pack into 8 bins of 96 tokens: 2 global batches of 4 per epoch, so 4 steps are
        # two whole epochs (the second reshuffled). A partial last batch is where processes
        # differ: accelerate fills the other ranks' slices with rows from the epoch's start.
        96,
    )
    artifact.save_pretrained(out / "adapter")
    return history, summary, out / "adapter"


def assert_same_training(one, two) -> dict[str, float]:
    import torch
    from safetensors.torch import load_file

    (history1, summary1, adapter1), (history2, summary2, adapter2) = one, two
    losses1 = [h["loss"] for h in history1 if h.get("loss") is not None]
    losses2 = [h["loss"] for h in history2 if h.get("loss") is not None]
    assert len(losses1) == len(losses2) == 4
    loss_diff = max(abs(a - b) for a, b in zip(losses1, losses2, strict=True))
    assert loss_diff < 1e-4, (losses1, losses2)
    weights1 = load_file(adapter1 / "adapter_model.safetensors")
    weights2 = load_file(adapter2 / "adapter_model.safetensors")
    assert weights1.keys() == weights2.keys()
    weight_diff = max((weights1[k] - weights2[k]).abs().max().item() for k in weights1)
    assert weight_diff < 1e-5
    for key in ("tokens_seen", "epochs", "global_batch_size"):
        assert summary1[key] == summary2[key], key
    # The logged token totals are those of the global batch, not of one process.
    assert [h["num_tokens"] for h in history1] == [h["num_tokens"] for h in history2]
    assert not torch.isnan(torch.tensor(losses2)).any()
    return {"loss": loss_diff, "adapter": weight_diff}


@pytest.fixture(scope="module")
def one_process(base_dir, tmp_path_factory):
    return run_training(base_dir, tmp_path_factory.mktemp("one"), per_device_train_batch_size=4)


def test_cpu_launch_starts_processes_rather_than_accelerates_one_process_launcher():
    command = accelerate_command(Path("/x/.launch"), 2)
    # `--cpu` alone would pick accelerate's single-process launcher.
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[command.index("--main_process_port") + 1] == "0"


def test_a_user_config_with_its_own_launcher_is_passed_through(tmp_path):
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n")
    command = accelerate_command(Path("/x/.launch"), 2, fsdp)
    assert command[command.index("--config_file") + 1] == str(fsdp)
    assert "--multi_gpu" not in command and "--num_machines" not in command
    plain = tmp_path / "ddp.yaml"
    plain.write_text("distributed_type: MULTI_CPU\nnum_machines: 1\n")
    assert "--multi_gpu" in accelerate_command(Path("/x/.launch"), 2, plain)


@pytest.mark.slow
def test_two_processes_equal_one_process_at_the_same_global_batch(base_dir, one_process, tmp_path):
    one = one_process
    two = run_training(base_dir, tmp_path / "two", per_device_train_batch_size=2, num_processes=2)
    assert two[1]["num_processes"] == 2 and one[1]["num_processes"] == 1
    assert two[1]["global_batch_size"] == one[1]["global_batch_size"] == 4
    diffs = assert_same_training(one, two)
    print(f"1 vs 2 processes: max loss diff {diffs['loss']:.3g}, adapter {diffs['adapter']:.3g}")
    (tmp_path / "diffs.json").write_text(json.dumps(diffs))


# Imported by every Python process started with the test's folder on PYTHONPATH; only rank 1 of
# the launched run does anything: its loss turns NaN at one optimizer step.
NAN_ON_RANK_1 = """
import os

if os.environ.get("RANK") == "1" and os.environ.get("SFT_TEST_NAN_AT_STEP"):
    from sft_pipeline.trainer.sft_trainer import SFTTrainer

    _step = int(os.environ["SFT_TEST_NAN_AT_STEP"])
    _compute_loss = SFTTrainer.compute_loss

    def compute_loss(self, *args, **kwargs):
        out = _compute_loss(self, *args, **kwargs)
        if self.state.global_step + 1 != _step:
            return out
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")

    SFTTrainer.compute_loss = compute_loss
"""


@pytest.mark.slow
def test_a_loss_that_turns_nan_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(
    base_dir, tmp_path, monkeypatch
):
    import os

    from sft_pipeline.common.errors import TrainingDivergedError

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SFT_TEST_NAN_AT_STEP", "3")
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as exc:
        run_training(base_dir, out, per_device_train_batch_size=2, num_processes=2, save_steps=2)
    message = str(exc.value)
    # Rank 1's loss is NaN; the reduced gradients are NaN on both ranks.
    assert "training diverged at optimizer step 3 of 4 (process 0, 1 of 2): loss nan" in message
    checkpoints = out / "checkpoints"
    assert f"the last good checkpoint {checkpoints / 'checkpoint-2'} is kept" in message
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter").exists()
    assert not (checkpoints / ".launch" / "result").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("first", ["main", "worker"])
def test_two_machines_on_loopback_started_in_either_order_equal_one_process(
    base_dir, one_process, tmp_path, first
):
    """docs/distributed.md's recipe, with two launchers on one host standing in for two
    machines (loopback rendezvous, a shared output_dir): the main machine runs the pipeline's
    training, the worker machine the documented `accelerate launch ... --wait` command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sft_pipeline.model.loading import load_tokenizer

    config = tmp_path / "accelerate_multinode.yaml"
    config.write_text(
        "distributed_type: MULTI_GPU\nnum_machines: 2\nmain_process_ip: 127.0.0.1\n"
        f"main_process_port: {_free_port()}\n"
    )
    tokenizer = load_tokenizer(base_dir)
    tokenized(tokenizer, 4).save_to_disk(tmp_path / "train")
    tokenized(tokenizer, 1).save_to_disk(tmp_path / "eval")
    output_dir = tmp_path / "checkpoints"
    spec = {
        "base_model_dir": str(base_dir),
        "train_tokens": str(tmp_path / "train"),
        "eval_tokens": str(tmp_path / "eval"),
        "quantization": {"load_in_4bit": False},
        "lora": LORA,
        "training": {
            **TRAINING,
            "output_dir": str(output_dir),
            "per_device_train_batch_size": 2,
            "num_processes": 2,  # the total over both machines
            "accelerate_config": str(config),
        },
        "max_length": 96,  # as run_training's
        "out": str(tmp_path / "two-machines"),
        "marker": str(tmp_path / "unused"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    # On a CPU accelerate joins the ranks with gloo when told so (the main machine's launch
    # sets it itself).
    env |= {"ACCELERATE_USE_CPU": "true", "SFT_PIPELINE_LAUNCH_WAIT_S": "240"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    worker = ["--module", "sft_pipeline.finetune.worker", "--wait", str(output_dir / ".launch")]
    commands = {
        "main": [sys.executable, str(Path(__file__).with_name("train_process.py")), "spec.json"],
        "worker": [*launch, "--num_processes", "2", "--machine_rank", "1", *worker],
    }
    order = [first, "worker" if first == "main" else "main"]
    started = {}
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in order}
    try:
        for name in order:
            started[name] = subprocess.Popen(
                commands[name],
                cwd=tmp_path,
                env=env,
                stdout=logs[name],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            time.sleep(4)  # the other machine starts seconds after this one (in its rendezvous)
        for name, process in started.items():
            assert process.wait(timeout=400) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    finally:
        for process in started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for log in logs.values():
            log.close()
    # Nothing of either launch is left behind.
    for process in started.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)
    history = json.loads((tmp_path / "two-machines" / "history.json").read_text())
    summary = json.loads((tmp_path / "two-machines" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    diffs = assert_same_training(one_process, (history, summary, tmp_path / "two-machines"))
    print(f"2 machines ({first} first) vs 1 process: {diffs}")
