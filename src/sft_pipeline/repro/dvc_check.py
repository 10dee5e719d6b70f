"""Whether `dvc.yaml` is what `kedro dvc generate` writes now: the project loaded for the
generator, the text it writes, and the check that every DVC stage runs before any work.

    kedro dvc generate    generate_text -> dvc.yaml
    kedro dvc check       generate_text == dvc.yaml, else a diff and `stale_message`
    each DVC stage        check_current (from the run hook): generate_text == dvc.yaml, else
                          StaleDvcYamlError(stale_message): DVC would run the stage with the old
                          deps and cache its result under the wrong key

Inside a stage, `kedro run` has bootstrapped the project and registered its pipeline already; the
import-graph walk reads each source file once, and parses only the modules whose bytes changed
since the previous walk (`IMPORTS_CACHE`), so the check costs a fraction of a second per stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sft_pipeline.repro import dvc_stages
from sft_pipeline.repro.code_graph import CodeGraph

DVC_YAML = "dvc.yaml"


def load_project(project_path: Path, env: str) -> tuple[Any, dvc_stages.Project]:
    """The `sft` pipeline from the pipelines registry and config from the project's loader."""
    from kedro.framework.project import pipelines, settings
    from kedro.framework.startup import bootstrap_project

    from sft_pipeline.common.log_markup import keep_messages_as_written

    project_path = project_path.resolve()
    # Cheap where `kedro run` bootstrapped already (the pipelines stay registered).
    metadata = bootstrap_project(project_path)
    keep_messages_as_written()  # bootstrapping configured Kedro's logging afresh
    conf_source = project_path / settings.CONF_SOURCE
    loader_args = dict(settings.CONFIG_LOADER_ARGS)
    base_env = loader_args.get("base_env") or "base"
    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(conf_source), env=env, **loader_args)
    catalog = {k: v for k, v in loader["catalog"].items() if not k.startswith("_")}
    envs = [base_env] if env == base_env else [base_env, env]
    conf_dir = Path(settings.CONF_SOURCE).as_posix()
    project = dvc_stages.Project(
        root=project_path,
        package=metadata.package_name,
        source_dir=metadata.source_dir,
        env=env,
        catalog=catalog,
        params=loader["parameters"],
        param_files=dvc_stages.read_config_files(project_path, conf_dir, envs, "parameters"),
        catalog_files=dvc_stages.read_config_files(project_path, conf_dir, envs, "catalog"),
    )
    if dvc_stages.PIPELINE_NAME not in pipelines:
        raise dvc_stages.DvcGenerationError(
            f"pipeline {dvc_stages.PIPELINE_NAME!r} is not registered (pipeline_registry.py)"
        )
    return pipelines[dvc_stages.PIPELINE_NAME], project


# Where the import statements of the project's modules are kept between DVC stages, by content
# (`sft_pipeline.repro.code_graph`): in the per-checkout state folder, never committed or tracked.
IMPORTS_CACHE = Path(".sft_pipeline") / "import_graph.json"


def generate_text(project_path: Path, env: str) -> str:
    """The `dvc.yaml` that `kedro dvc generate --env <env>` writes for the project now."""
    pipeline, project = load_project(project_path, env)
    graph = CodeGraph(project.source_dir, project.package, project.root / IMPORTS_CACHE)
    text = dvc_stages.render(dvc_stages.build_dvc_yaml(pipeline, project, graph), env)
    graph.save_cache()
    return text


def stale_message(env: str, stage: str | None = None) -> str:
    """What a stale `dvc.yaml` is told with, from `kedro dvc check` or inside a DVC stage."""
    args = "" if env == "base" else f" --env {env}"
    if stage is None:
        return f"{DVC_YAML} is stale: run `kedro dvc generate{args}`"
    return (
        f"{DVC_YAML} is stale (DVC stage {stage!r}): the pipeline, the catalog or the files "
        f"the parameters name changed since it was generated; run `kedro dvc generate{args}`"
        " and then `dvc repro` again"
    )


def check_current(project_path: Path, env: str, stage: str) -> None:
    """Inside a DVC stage: stop before any work when dvc.yaml is not what `kedro dvc generate`
    writes now (a parameter names other files, a node or catalog entry changed)."""
    target = project_path / DVC_YAML
    if not target.is_file():
        return
    if target.read_text(encoding="utf-8") != generate_text(project_path, env):
        raise dvc_stages.StaleDvcYamlError(stale_message(env, stage))


def env_of(dvc_yaml_text: str) -> str | None:
    """The Kedro environment an existing dvc.yaml was generated for (from its commands)."""
    match = re.search(r"--env=(\S+)", dvc_yaml_text)
    return match.group(1) if match else None
