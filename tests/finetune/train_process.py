"""One training run in its own process, for tests that kill it: `python train_process.py SPEC`.

SPEC is a JSON file: `base_model_dir`, `train_tokens` and `eval_tokens` (`save_to_disk`
folders), the `quantization`, `lora` and `training` sections, optionally `max_length`, `out`
(where the adapter and `summary.json` go) and `marker` (a file this process creates when it
stops to be killed). At most one of:

- `stop_after_save: N`: once checkpoint-N is complete, create `marker` and wait to be killed;
- `stop_in_save: N`: while saving checkpoint-N, write half of its trainer_state.json (the last
  file the trainer writes), create `marker` and wait to be killed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _wait_to_be_killed(marker: Path) -> None:
    marker.write_text("stopped\n")
    while True:
        time.sleep(1)


def main(spec_path: str) -> None:
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from transformers.trainer_callback import TrainerState

    from sft_pipeline.common.config import LoraConfig, QuantizationConfig, TrainingConfig
    from sft_pipeline.finetune import workflow
    from sft_pipeline.finetune.job import TrainJob

    spec = json.loads(Path(spec_path).read_text())
    marker = Path(spec["marker"])
    callbacks = []
    if "stop_after_save" in spec:
        step = spec["stop_after_save"]

        class StopAfterSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    _wait_to_be_killed(marker)

        callbacks.append(StopAfterSave())
    if "stop_in_save" in spec:
        step = spec["stop_in_save"]
        save_to_json = TrainerState.save_to_json

        def half_written(self, json_path):
            if self.global_step != step:
                return save_to_json(self, json_path)
            text = json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)
            with open(json_path, "w", encoding="utf-8") as f:
                f.write(text[: len(text) // 2])
            _wait_to_be_killed(marker)

        TrainerState.save_to_json = half_written

    train_tokens = load_from_disk(spec["train_tokens"])
    eval_tokens = load_from_disk(spec["eval_tokens"])
    job = TrainJob(
        base_model_dir=Path(spec["base_model_dir"]),
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        quantization=QuantizationConfig(**spec["quantization"]),
        lora=LoraConfig(**spec["lora"]),
        training=TrainingConfig(**spec["training"]),
        max_length=spec.get("max_length")
        or max(len(ids) for ds in (train_tokens, eval_tokens) for ids in ds["input_ids"]),
    )
    artifact, history, summary = workflow.train(job, callbacks=callbacks)
    out = Path(spec["out"])
    artifact.save_pretrained(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "history.json").write_text(json.dumps(history, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
