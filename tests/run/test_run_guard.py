"""What the run-start hook relies on: remote code only from parameters, credentials into the
environment (never overriding it), leftovers of killed atomic writes removed."""

from __future__ import annotations

import json
import os

import pytest

from sft_pipeline.common.atomic import atomic_path, remove_leftovers
from sft_pipeline.model import loading as model_loading
from sft_pipeline.model.loading import ModelResolutionError, trust_remote_code
from sft_pipeline.run.hooks import export_credentials


@pytest.fixture
def remote_code_folder(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps({"model_path": ".", "trust_remote_code": True})
    )
    yield tmp_path
    model_loading.allow_remote_code(False)


def test_a_manifest_alone_never_turns_remote_code_on(remote_code_folder):
    model_loading.allow_remote_code(False)
    with pytest.raises(ModelResolutionError, match=r"set model\.trust_remote_code: true"):
        trust_remote_code(remote_code_folder)


def test_remote_code_runs_when_the_parameters_allow_it(remote_code_folder):
    model_loading.allow_remote_code(True)
    assert trust_remote_code(remote_code_folder) is True
    # Allowing it does not turn it on for a model that does not ask for it.
    (remote_code_folder / "manifest.json").write_text(json.dumps({"trust_remote_code": False}))
    assert trust_remote_code(remote_code_folder) is False


def test_credentials_go_to_the_environment_which_wins(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "from-the-environment")
    exported = export_credentials(
        {"huggingface": {"token": "hf_from_file"}, "wandb": {"api_key": "from-file"}}
    )
    assert exported == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == "hf_from_file"
    assert os.environ["WANDB_API_KEY"] == "from-the-environment"


def test_leftovers_of_interrupted_atomic_writes_are_removed_and_other_tools_files_kept(
    tmp_path, caplog
):
    import logging

    target = tmp_path / "records.parquet"
    target.write_text("complete")
    # What a kill inside atomic_path leaves: the temporary sibling (a file or a folder).
    with atomic_path(target) as tmp:
        tmp.write_text("half")
        leftover_file = tmp.with_name(tmp.name + "x")
        leftover_file.write_text("half")
    assert ".records.parquet.sft-pipeline-tmp-" in leftover_file.name
    (tmp_path / ".train_tokens.sft-pipeline-tmp-abc").mkdir()
    (tmp_path / ".adapter.sft-pipeline-old-def").mkdir()
    # Another tool's temporary files, named the way ours used to be: not ours to delete.
    (tmp_path / ".report.tmp-xyz").write_text("theirs")
    (tmp_path / ".cache.old-1").mkdir()

    with caplog.at_level(logging.WARNING, logger="sft_pipeline.common.atomic"):
        removed = remove_leftovers(tmp_path)
    assert {p.name for p in removed} == {
        leftover_file.name,
        ".train_tokens.sft-pipeline-tmp-abc",
        ".adapter.sft-pipeline-old-def",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cache.old-1",
        ".report.tmp-xyz",
        "records.parquet",
    ]
    assert f"leaving {tmp_path / '.report.tmp-xyz'} alone" in caplog.text
    assert f"leaving {tmp_path / '.cache.old-1'} alone" in caplog.text
    assert target.read_text() == "half"


def test_dvc_stages_read_conf_local_credentials_under_env_base(tmp_path, monkeypatch, caplog):
    # A DVC stage is `kedro run --env=base`: Kedro's loader then reads conf/base only.
    import logging
    from types import SimpleNamespace

    from kedro.config import OmegaConfigLoader

    from sft_pipeline.run.hooks import RunGuard

    conf = tmp_path / "conf"
    (conf / "base").mkdir(parents=True)
    (conf / "local").mkdir()
    (conf / "local" / "credentials.yml").write_text(
        "huggingface:\n  token: hf_from_local\nwandb:\n  api_key: local-key\n"
    )
    (conf / "base" / "credentials.yml").write_text("wandb:\n  api_key: base-key\n")
    for name in ("HF_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")  # restored (or removed again) after the test
        monkeypatch.delenv(name)
    loader = OmegaConfigLoader(
        conf_source=str(conf), env="base", base_env="base", default_run_env="local"
    )
    with caplog.at_level(logging.INFO, logger="sft_pipeline.run.hooks"):
        RunGuard().after_context_created(SimpleNamespace(config_loader=loader))
    assert os.environ["HF_TOKEN"] == "hf_from_local"
    assert os.environ["WANDB_API_KEY"] == "base-key"  # the run's environment comes first
    assert "credentials from conf/local/credentials.yml: HF_TOKEN" in caplog.text
    assert "hf_from_local" not in caplog.text
