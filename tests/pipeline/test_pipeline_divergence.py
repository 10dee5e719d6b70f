"""A diverging run through the real `kedro run`: exit code 1, the named error, and no adapter,
merged model or export for anything downstream to pick up."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from tests import project_copy as pc
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.slow


def test_a_base_whose_forward_overflows_fails_the_run_and_ships_nothing(tmp_path):
    project = pc.make_project(tmp_path / "project", with_model=False)
    model_dir = save_tiny_model(project / pc.TINY_MODEL)
    weights = load_file(str(model_dir / "model.safetensors"))
    # Logits of +-inf at the first forward pass: the loss of step 1 is NaN.
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1e38
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    pc.set_params(project, {"export": {"gguf": ["f16"]}, "training": {"save_steps": 1}})

    proc = pc.kedro(project, "run", "--pipeline=sft", "--env", pc.TINY_ENV)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "training diverged at optimizer step 1" in output, output[-4000:]
    assert "learning rate" in output and "learning_rate" in output
    models = project / "data" / "06_models"
    assert (models / "base").is_dir()  # the stages before training ran
    for artifact in ("adapter", "merged", "export"):
        assert not (models / artifact).exists(), artifact
    assert not list((models / "checkpoints").glob("checkpoint-*"))
