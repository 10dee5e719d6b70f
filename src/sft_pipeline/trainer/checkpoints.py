"""How `SFTTrainer` writes checkpoints: marked as ours, rotated among ours, arguments as JSON.

A checkpoint folder gets `CHECKPOINT_MARKER` (written by whom, at which step, in which
precision) before anything else goes in, so resuming and rotation can tell our checkpoints from
folders someone else put in `output_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sft_pipeline.common.ownership import CHECKPOINT_MARKER, own_checkpoints

log = logging.getLogger(__name__)

TRAINING_ARGS_JSON = "training_args.json"


class OwnCheckpoints:
    """`transformers.Trainer` mixin: checkpoint saving and rotation that touch only our folders."""

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
