"""Touch only what is ours: the marks this project leaves on what it writes, and how cleanup
tells its own files from anyone else's.

    output_dir/
      checkpoint-100/                  holds sft_pipeline_checkpoint.json: ours (the trainer
        sft_pipeline_checkpoint.json   writes it first, before any weight)
      checkpoint-7/                    no marker: another tool's; left alone, with a warning
    <artifact folder>/
      .train_tokens.sft-pipeline-tmp-1a2b3c   an interrupted atomic write of ours: removed
      .adapter.tmp-x9                         someone else's temporary file: left, with a warning
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_MARKER = "sft_pipeline_checkpoint.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_checkpoint_name(path: Path) -> bool:
    return bool(CHECKPOINT_RE.match(path.name)) and path.is_dir()


def is_own_checkpoint(path: Path) -> bool:
    """Whether `path` is a `checkpoint-N` folder written by this project's trainer."""
    return is_checkpoint_name(path) and (path / CHECKPOINT_MARKER).is_file()


def checkpoint_step(path: Path) -> int:
    """N of a `checkpoint-N` folder."""
    return int(CHECKPOINT_RE.match(path.name).group(1))


def own_checkpoints(folder: Path) -> list[Path]:
    """The `checkpoint-N` folders this project's trainer wrote in `folder`, by step."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_own_checkpoint(p)), key=checkpoint_step)


def foreign_checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-N` folders in `folder` without this project's marker, by step."""
    found = [p for p in folder.iterdir() if is_checkpoint_name(p) and not is_own_checkpoint(p)]
    return sorted(found, key=checkpoint_step)
