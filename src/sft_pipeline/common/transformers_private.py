"""Every private API of transformers the project relies on, in one place.

A private name may change in any release of transformers; each one used is reached through this
module (or, for a `Trainer` method the trainer overrides, named in `TRAINER_HOOKS`), with the
release it was checked against: transformers 5.24.0, the version pyproject.toml pins.
`check_trainer_hooks` runs when the trainer module is imported, so a release without one of them
fails at once, naming it, instead of leaving an override that silently never runs.

    private API                                     what for, and where
    ----------------------------------------------  -----------------------------------------
    Trainer._get_train_sampler (overridden)         seeded length-grouped order (trainer)
    Trainer._get_grad_norm (overridden)             pre-clip norm for the NaN guard (trainer)
    Trainer._track_num_input_tokens (overridden)    non-padding counts of packed rows (trainer)
    Trainer._save_checkpoint, _save (overridden)    marked checkpoints, JSON args (checkpoints)
    Trainer._get_learning_rate                      the rate in a divergence message (guard)
    chat_template_utils._compile_jinja_template     a template's pinned clock (chat_templates)
    chat_template_utils._get_control_token_patterns,
    PreTrainedTokenizerBase._get_control_tokens     control-token text stays text (templating)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

CHECKED_AGAINST = "5.24.0"
# Trainer methods the trainer overrides (each calling the original) or calls: name -> why.
TRAINER_HOOKS = {
    "_get_train_sampler": "seeded length-grouped order (the same rows per step on resume)",
    "_get_grad_norm": "the pre-clip gradient norm, for the non-finite guard",
    "_track_num_input_tokens": "non-padding token counts of packed rows",
    "_save_checkpoint": "checkpoints marked as ours and rotated among ours only",
    "_save": "training arguments kept as JSON beside the weights",
    "_get_learning_rate": "the learning rate a divergence message names (called only)",
}


def check_trainer_hooks(trainer_class: type) -> None:
    """Fail, naming them, when `trainer_class` lacks a private method the trainer relies on."""
    missing = [name for name in TRAINER_HOOKS if not callable(getattr(trainer_class, name, None))]
    if missing:
        from importlib.metadata import version

        raise ImportError(
            f"transformers {version('transformers')}: Trainer has no {', '.join(missing)}, "
            f"which sft_pipeline's SFTTrainer relies on (checked against {CHECKED_AGAINST}); "
            "install the version pinned in pyproject.toml"
        )


def learning_rate(trainer: Any) -> float:
    """The learning rate the trainer's scheduler gives the current step."""
    return trainer._get_learning_rate()


def compiled_template(template: str) -> Any:
    """transformers' compiled (cached, sandboxed) jinja template of a chat template text."""
    return _compiler()(template)


@functools.cache
def _compiler() -> Callable[[str], Any]:
    # Looked up once: every render asks for its template (to pin the clock).
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template


def template_control_tokens(tokenizer: Any, template: str) -> tuple[str, ...]:
    """The control tokens a chat template writes (its special and added tokens), as transformers
    decides them."""
    return tuple(tokenizer._get_control_tokens(template))


def control_token_patterns(tokens: Iterable[str]) -> tuple[re.Pattern, re.Pattern]:
    """transformers' (control tokens, marked control tokens or lone markers) regexes."""
    from transformers.utils.chat_template_utils import _get_control_token_patterns

    return _get_control_token_patterns(tuple(tokens))
