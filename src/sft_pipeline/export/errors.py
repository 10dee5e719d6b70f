"""The errors of the export half: what stops a merge or a GGUF export, and why."""

from __future__ import annotations

from sft_pipeline.common.errors import UserError


class ExportError(UserError, ValueError):
    """The model cannot be written as GGUF (architecture, tokenizer or config not supported)."""


class NotShardwise(ValueError):
    """The adapter or the checkpoint needs a whole-model merge; the message says why.

    Not the user's to fix: the merge falls back to PEFT on the whole model when it meets one.
    """
