"""Names read from files stay inside the folder they name a file in."""

from __future__ import annotations

import json

import pytest

from sft_pipeline.common.paths import UnsafePathError, inside, read_shard_index


def test_plain_shard_names_are_accepted_and_escapes_refused(tmp_path):
    assert inside(tmp_path, "model-00001-of-00002.safetensors", source="x", what="shard") == (
        tmp_path / "model-00001-of-00002.safetensors"
    )
    for bad in ("../x", "/etc/passwd", "a/../../x", "", "a\\..\\x", 3, None):
        with pytest.raises(UnsafePathError, match=r"index\.json"):
            inside(tmp_path, bad, source="index.json", what="shard file")


def test_a_shard_name_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (checkpoint / "model-1.safetensors").symlink_to(tmp_path / "secret.safetensors")
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(UnsafePathError, match=r"resolves to .*secret.safetensors, outside"):
        read_shard_index(index)


def test_a_checkpoint_with_a_crafted_index_is_not_resumed_from(tmp_path):
    from sft_pipeline.finetune.run_state import checkpoint_problem

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../../etc/passwd"}})
    )
    problem = checkpoint_problem(checkpoint)
    assert "model.safetensors.index.json is unusable" in problem
    assert "'../../../etc/passwd' leaves" in problem
