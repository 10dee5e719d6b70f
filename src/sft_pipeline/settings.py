"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from sft_pipeline.run.hooks import ArtifactPaths, RunGuard
from sft_pipeline.run.output import RunOutput

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # "soft": an environment file (conf/local, conf/ci) that sets one key of a section overrides
    # that key only; the default "destructive" merge would reset the section's other keys.
    "merge_strategy": {"parameters": "soft"},
}

# RunGuard: parameters checked, the run lock taken, leftovers removed before any node.
# RunOutput: known third-party noise filtered; a run that evaluated ends with its result.
HOOKS = (ArtifactPaths(), RunGuard(), RunOutput())
