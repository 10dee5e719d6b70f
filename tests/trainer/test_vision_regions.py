"""Which parameters `training.train_vision_tower` and `training.train_projector` train, per
vision family, read against each model's own module tree (where its projector and its tower
sit), for LoRA targets and for full fine-tuning alike."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from sft_pipeline.trainer import vision
from tests.vision_models import EXTRA_FAMILIES, VISION_FAMILIES, build_vision_model

# Where each family keeps its parts, as the model classes name them. Qwen2-VL and Qwen2.5-VL nest
# their projector (the patch merger) inside the vision tower.
PARTS = {
    "llava": {"tower": "model.vision_tower.", "projector": "model.multi_modal_projector."},
    "idefics3": {"tower": "model.vision_model.", "projector": "model.connector."},
    "gemma3": {"tower": "model.vision_tower.", "projector": "model.multi_modal_projector."},
    "qwen2_vl": {"tower": "model.visual.", "projector": "model.visual.merger."},
    "qwen2_5_vl": {"tower": "model.visual.", "projector": "model.visual.merger."},
}


def part_of(name: str, family: str) -> str:
    if name.startswith(PARTS[family]["projector"]):
        return "projector"
    if name.startswith(PARTS[family]["tower"]):
        return "vision_tower"
    return "language_model"


@pytest.fixture(scope="module", params=[*VISION_FAMILIES, *EXTRA_FAMILIES])
def family_model(request, fixtures_dir):
    model, _ = build_vision_model(request.param, fixtures_dir)
    return request.param, model


@pytest.mark.parametrize(("tower", "projector"), list(itertools.product([False, True], repeat=2)))
def test_each_switch_trains_exactly_its_own_part_of_the_model(family_model, tower, projector):
    family, model = family_model
    names = [n for n, _ in model.named_parameters()]
    assert {part_of(n, family) for n in names} == {"language_model", "vision_tower", "projector"}
    wanted = {"language_model"} | ({"vision_tower"} if tower else set())
    wanted |= {"projector"} if projector else set()
    regions = vision.trained_regions(tower, projector)

    # LoRA: the linear layers adapted are exactly those of the wanted parts (but the head).
    linear = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"
    ]
    if not any(part_of(n, family) == "projector" for n in linear) and projector:
        # Gemma-3's projector is a bare weight: refused for LoRA, never silently untrained.
        with pytest.raises(ValueError, match=r"train_projector: .* no linear layer"):
            vision.lora_target_modules(model, "all-linear", regions)
    else:
        pattern = re.compile(vision.lora_target_modules(model, "all-linear", regions))
        adapted = {part_of(n, family) for n in linear if pattern.match(n)}
        skipped = {part_of(n, family) for n in linear if not pattern.match(n)}
        assert adapted == wanted
        assert not skipped & wanted

    # Full fine-tuning: gradients exactly for the wanted parts.
    try:
        vision.freeze_untrained(model, regions)
        trained = {part_of(n, family) for n, p in model.named_parameters() if p.requires_grad}
        frozen = {part_of(n, family) for n, p in model.named_parameters() if not p.requires_grad}
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert trained == wanted
    assert not frozen & wanted
