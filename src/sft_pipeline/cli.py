"""Project CLI commands: `kedro dvc generate|check`, `kedro sft chat|generate`, and `kedro run`
with clean errors. Only the command wiring lives here: what `dvc.yaml` should hold and whether
it is current is `sft_pipeline.repro.dvc_check`'s answer.

Registered through the `kedro.project_commands` entry point in pyproject.toml, so they run
inside the bootstrapped project like `kedro run`.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from sft_pipeline.export.chat_cli import sft
from sft_pipeline.repro import dvc_check, dvc_stages
from sft_pipeline.repro.dvc_check import DVC_YAML


def _generate_text(project_path: Path, env: str) -> str:
    try:
        return dvc_check.generate_text(project_path, env)
    except dvc_stages.DvcGenerationError as exc:
        raise click.ClickException(str(exc)) from exc


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
    text = _generate_text(project_path, env)
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
    env = env or dvc_check.env_of(current) or "base"
    expected = _generate_text(project_path, env)
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
    raise click.ClickException(dvc_check.stale_message(env))


@dvc.command()
@click.option("--env", "-e", default="local", show_default=True, help="Where credentials.yml is.")
@click.pass_obj
def credentials(metadata, env: str) -> None:
    """Give DVC the remotes' credentials of conf/<env>/credentials.yml (`dvc_remotes`)."""
    from kedro.framework.project import settings

    from sft_pipeline.repro import remotes

    project_path = Path(metadata.project_path)
    conf_source = project_path / settings.CONF_SOURCE
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(conf_source), env=env, **dict(settings.CONFIG_LOADER_ARGS)
    )
    source = f"{Path(settings.CONF_SOURCE).as_posix()}/{env}/credentials.yml"
    try:
        found = loader["credentials"]
    except KeyError:
        found = {}
    try:
        names = remotes.apply_credentials(project_path, found, source)
    except remotes.RemoteCredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    if not names:
        raise click.ClickException(f"{source}: no `{remotes.SECTION}` section to apply")
    click.echo(f"credentials of {', '.join(names)} written to .dvc/config.local and checked")


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
