"""Project CLI commands: `kedro dvc generate|check` and `kedro sft chat|generate`.

Registered through the `kedro.project_commands` entry point in pyproject.toml, so they run
inside the bootstrapped project like `kedro run`.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from sft_pipeline.export.chat_cli import sft
from sft_pipeline.repro import dvc_stages

DVC_YAML = "dvc.yaml"


def load_project(project_path: Path, env: str) -> tuple[Any, dvc_stages.Project]:
    """The `sft` pipeline from the pipelines registry and config from the project's loader."""
    from kedro.framework.project import pipelines, settings
    from kedro.framework.startup import bootstrap_project

    project_path = project_path.resolve()
    metadata = bootstrap_project(project_path)
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
        raise click.ClickException(
            f"pipeline {dvc_stages.PIPELINE_NAME!r} is not registered (pipeline_registry.py)"
        )
    return pipelines[dvc_stages.PIPELINE_NAME], project


def generate_text(project_path: Path, env: str) -> str:
    pipeline, project = load_project(project_path, env)
    try:
        content = dvc_stages.build_dvc_yaml(pipeline, project)
    except dvc_stages.DvcGenerationError as exc:
        raise click.ClickException(str(exc)) from exc
    return dvc_stages.render(content, env)


def check_current(project_path: Path, env: str, stage: str) -> None:
    """Inside a DVC stage: stop before any work when dvc.yaml is not what `kedro dvc generate`
    writes now (a parameter names other files, a node or catalog entry changed): DVC would run
    with the old deps and cache a result under the wrong key."""
    target = project_path / DVC_YAML
    if not target.is_file():
        return
    expected = generate_text(project_path, env)
    if target.read_text(encoding="utf-8") != expected:
        args = "" if env == "base" else f" --env {env}"
        raise dvc_stages.StaleDvcYamlError(
            f"{DVC_YAML} is stale (DVC stage {stage!r}): the pipeline, the catalog or the files "
            f"the parameters name changed since it was generated; run `kedro dvc generate{args}`"
            " and then `dvc repro` again"
        )


def env_of(dvc_yaml_text: str) -> str | None:
    """The Kedro environment an existing dvc.yaml was generated for (from its commands)."""
    match = re.search(r"--env=(\S+)", dvc_yaml_text)
    return match.group(1) if match else None


@click.group(name="sft_pipeline")
def commands() -> None:
    """sft-pipeline project commands."""


@commands.group(name="dvc")
def dvc() -> None:
    """Keep dvc.yaml in step with the `sft` pipeline."""


_ENV_HELP = (
    "Kedro environment the stages run with and whose parameter files DVC tracks on top of "
    "conf/base. Default: base, so conf/local (git-ignored) never changes a DVC-run result "
    "unseen; CI uses `--env ci`."
)


@dvc.command()
@click.option("--env", "-e", default="base", show_default=True, help=_ENV_HELP)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), default=None, help="Default: ./dvc.yaml"
)
@click.pass_obj
def generate(metadata, env: str, output: str | None) -> None:
    """Write dvc.yaml: one stage per node of the `sft` pipeline."""
    from sft_pipeline.common.atomic import write_text

    project_path = Path(metadata.project_path)
    text = generate_text(project_path, env)
    target = Path(output) if output else project_path / DVC_YAML
    write_text(target, text)
    stages = len(yaml.safe_load(text)["stages"])
    click.echo(f"wrote {target} ({stages} stages, env {env})")
    if env == "local":
        click.secho(
            "warning: conf/local is git-ignored, so this dvc.yaml tracks files another clone "
            "lacks; commit a dvc.yaml generated for a tracked environment.",
            fg="yellow",
            err=True,
        )


@dvc.command()
@click.option("--env", "-e", default=None, help="Default: the environment dvc.yaml names.")
@click.pass_obj
def check(metadata, env: str | None) -> None:
    """Fail when dvc.yaml differs from what `kedro dvc generate` would write."""
    project_path = Path(metadata.project_path)
    target = project_path / DVC_YAML
    current = target.read_text(encoding="utf-8") if target.is_file() else ""
    env = env or env_of(current) or "base"
    expected = generate_text(project_path, env)
    if current == expected:
        click.echo(f"{DVC_YAML} is up to date (env {env})")
        return
    diff = difflib.unified_diff(
        current.splitlines(keepends=True),
        expected.splitlines(keepends=True),
        f"{DVC_YAML} (committed)",
        f"{DVC_YAML} (generated)",
    )
    click.echo("".join(diff), err=True)
    args = "" if env == "base" else f" --env {env}"
    raise click.ClickException(f"{DVC_YAML} is stale: run `kedro dvc generate{args}`")


def _run_with_clean_errors(traceback: bool, **kwargs: Any) -> Any:
    from kedro.framework.cli.project import run as kedro_run

    from sft_pipeline.run import failure

    try:
        return kedro_run.callback(**kwargs)
    except Exception as exc:
        error = failure.user_error(exc)
        if error is None:
            raise  # a bug: its traceback is the report
        project = Path.cwd()
        log_file = failure.write_error_log(exc, project)
        if traceback:
            import traceback as tb

            click.echo("".join(tb.format_exception(exc)), err=True)
        click.secho(failure.summary(error, log_file, project), fg="red", err=True)
        sys.exit(1)


def _run_command() -> click.Command:
    """Kedro's `kedro run`, with one change: a mistake the user can fix ends in one short block
    and exit code 1 (sft_pipeline.run.failure); `--traceback` prints the full traceback too."""
    from kedro.framework.cli.project import run as kedro_run

    flag = click.Option(
        ["--traceback"],
        is_flag=True,
        default=False,
        help="Also print the full traceback of an input or parameter error (it is always "
        "written to .sft_pipeline/last_error.log).",
    )
    return click.Command(
        name="run",
        callback=_run_with_clean_errors,
        params=[*kedro_run.params, flag],
        help=kedro_run.help,
        short_help=kedro_run.short_help,
    )


commands.add_command(sft)
commands.add_command(_run_command())

# Kedro imports `<package>.cli` itself and requires a `cli` group there (its commands may
# override the built-in ones); ours only adds commands, the same ones the entry point declares.
cli = commands
