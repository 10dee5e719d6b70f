"""The private transformers APIs the project relies on exist in the pinned release, and a
release without one fails at import naming it."""

from __future__ import annotations

import pytest

from sft_pipeline.common import transformers_private


def test_the_pinned_trainer_has_every_private_method_the_trainer_relies_on():
    from transformers import Trainer

    transformers_private.check_trainer_hooks(Trainer)


def test_a_trainer_without_one_of_them_fails_naming_it():
    from transformers import Trainer

    class Older:  # a Trainer of a release that renamed one private method
        pass

    for name in transformers_private.TRAINER_HOOKS:
        if name != "_get_grad_norm":
            setattr(Older, name, getattr(Trainer, name))
    with pytest.raises(ImportError, match=r"Trainer has no _get_grad_norm.*checked against"):
        transformers_private.check_trainer_hooks(Older)


def test_template_helpers_reach_transformers_private_functions():
    compiled = transformers_private.compiled_template("{{ messages[0]['content'] }}")
    assert compiled.render(messages=[{"content": "hi"}]) == "hi"
    plain, _ = transformers_private.control_token_patterns(["<|im_end|>"])
    assert plain.search("a<|im_end|>b")
