"""Kedro hooks of the project (registered in `settings.py`).

Before any node of a `kedro run` (hence of any DVC stage) touches an artifact, `RunGuard`:

    check the whole parameter tree        config.validate_parameters (typos, ranges)
    in a DVC stage: dvc.yaml still current repro.dvc_check (else "dvc.yaml is stale")
    take the project's run lock           run_lock.RunLock (a second run stops here)
    allow remote code or not              model_loading.allow_remote_code (parameters only)
    remove leftovers of killed writes     atomic.remove_leftovers, in every artifact folder

and releases the lock when the run ends, successfully or not. Credentials are handed to the
libraries through their environment variables when the context is created; they never reach
parameters, artifacts or logs. Where a variable is set in more than one place, the first wins:

    the environment                       HF_TOKEN=... kedro run
    the run's Kedro environment           conf/<env>/credentials.yml (then conf/base)
    conf/local/credentials.yml            also under --env=<other>, as in every DVC stage
                                          (`--env=base`): credentials never change a result
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)

# Dataset name -> file path of this run's catalog, for messages that point at an artifact.
_ARTIFACT_PATHS: dict[str, str] = {}
# credentials.yml (section, key) -> the environment variable the library reads it from.
CREDENTIAL_ENV = {
    ("huggingface", "token"): "HF_TOKEN",
    ("wandb", "api_key"): "WANDB_API_KEY",
}


def artifact_path(name: str) -> str:
    """The file of catalog dataset `name` in this run (the catalog holds the path, not code)."""
    return _ARTIFACT_PATHS.get(name, f"the `{name}` dataset")


class ArtifactPaths:
    """Remembers the file path of every catalog dataset when the catalog is created."""

    @hook_impl
    def after_catalog_created(self, catalog: Any) -> None:
        _ARTIFACT_PATHS.clear()
        for name in catalog:
            filepath = getattr(catalog.get(name), "_filepath", None)
            if filepath is not None:
                _ARTIFACT_PATHS[name] = Path(filepath).as_posix()


def export_credentials(credentials: dict[str, Any]) -> list[str]:
    """Put known credentials into the environment variables their libraries read.

    A variable already set in the environment wins. Returns the names set (never the values).
    """
    exported = []
    for (section, key), variable in CREDENTIAL_ENV.items():
        value = (credentials.get(section) or {}).get(key)
        if value and not os.environ.get(variable):
            os.environ[variable] = str(value)
            exported.append(variable)
    return exported


def local_credentials(loader: Any) -> dict[str, Any]:
    """The credentials of `conf/local` when the run's environment is another one (a DVC stage
    runs `--env=base`); {} when it is `local` already or there are none."""
    from kedro.config import MissingConfigException

    env = getattr(loader, "env", None)
    default = getattr(loader, "default_run_env", "local")
    if env in (None, "local") or default != "local":
        return {}
    try:
        local = type(loader)(
            conf_source=str(loader.conf_source),
            env="local",
            base_env=getattr(loader, "base_env", "base"),
            default_run_env="local",
        )
        return local["credentials"] or {}
    except MissingConfigException:
        return {}


class RunGuard:
    """Checks, lock and clean-up around every pipeline run (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        from kedro.config import MissingConfigException

        loader = context.config_loader
        try:
            credentials = loader["credentials"]
        except MissingConfigException:
            credentials = {}
        exported = export_credentials(credentials or {})
        if exported:
            log.info("credentials from conf/*/credentials.yml: %s", ", ".join(exported))
        local = export_credentials(local_credentials(loader))
        if local:
            log.info("credentials from conf/local/credentials.yml: %s", ", ".join(local))

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from sft_pipeline.common.atomic import remove_leftovers
        from sft_pipeline.common.config import validate_parameters
        from sft_pipeline.model.loading import allow_remote_code
        from sft_pipeline.run.lock import RunLock

        params = validate_parameters(catalog.load("parameters"))
        project = Path(run_params.get("project_path") or Path.cwd())
        if os.environ.get("DVC_STAGE"):
            # A stage of `dvc repro`: its dvc.yaml must still describe this pipeline. Imported
            # by name on purpose: the check reads the whole pipeline's code but changes no byte
            # of any artifact, so it must not make every stage depend on every module.
            import importlib

            dvc_check = importlib.import_module("sft_pipeline.repro.dvc_check")
            env = run_params.get("env") or "base"
            dvc_check.check_current(project, env, os.environ["DVC_STAGE"])
        if self._lock is not None:
            # An earlier run in this process ended without its after/error hook.
            self._lock.release()
        self._lock = RunLock(project)
        self._lock.acquire()
        try:
            allow_remote_code(params.model.trust_remote_code)
            folders = {Path(p).parent for p in _ARTIFACT_PATHS.values()}
            folders.add(Path(params.training.output_dir))
            for folder in sorted(folders):
                for leftover in remove_leftovers(folder):
                    log.info("removed %s, left by an interrupted write", leftover)
        except BaseException:
            self._release()
            raise

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
