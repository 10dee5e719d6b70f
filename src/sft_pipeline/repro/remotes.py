"""DVC remotes' credentials from `conf/local/credentials.yml` (`kedro dvc credentials`).

    conf/local/credentials.yml               .dvc/config.local (git-ignored; DVC reads it)
      dvc_remotes:                             ['remote "storage"']
        storage:                     ---->       access_key_id = AKIA...
          access_key_id: AKIA...                 secret_access_key = ...
          secret_access_key: ...

DVC reads a remote's credentials from its own configuration, never from Kedro's. This writes the
ones of `conf/local/credentials.yml` there (`dvc remote modify --local`), so the committed
`.dvc/config` holds only the remote's URL and options, then lists each remote's storage folder
with them: a wrong key is one error naming the remote here, not a bare "403 Forbidden" at the
next `dvc push`.
"""

from __future__ import annotations

import contextlib
import difflib
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sft_pipeline.common.errors import UserError

SECTION = "dvc_remotes"
# The credential options of each DVC remote type (DVC's own names).
CREDENTIAL_KEYS: dict[str, tuple[str, ...]] = {
    "s3": ("access_key_id", "secret_access_key", "session_token", "profile", "credentialpath"),
    "gs": ("credentialpath", "projectname"),
    "ssh": ("user", "password", "keyfile", "passphrase"),
    "azure": ("account_name", "account_key", "connection_string", "sas_token"),
}


class RemoteCredentialsError(UserError, RuntimeError):
    """A remote named in credentials.yml is unknown, or refuses the credentials given."""


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def remote_urls(project: Path) -> dict[str, str]:
    """{remote name: URL} of the project's DVC configuration."""
    listed = _dvc(["remote", "list"], project)
    if listed.returncode != 0:
        raise RemoteCredentialsError(f"`dvc remote list` failed in {project}: {listed.stderr}")
    # One remote a line: name, URL, and "(default)" after the default one.
    rows = [line.split() for line in listed.stdout.splitlines() if line.strip()]
    return {row[0]: row[1] for row in rows if len(row) >= 2}


def remote_type(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else "local"
    return {"s3": "s3", "gs": "gs", "gcs": "gs", "ssh": "ssh", "azure": "azure"}.get(scheme, scheme)


def apply_credentials(project: Path, credentials: Mapping[str, Any], source: str) -> list[str]:
    """Write each remote's credentials into `.dvc/config.local`, then check the remote answers.

    Returns the names of the remotes set up. `source` names the file, for messages.
    """
    remotes = credentials.get(SECTION) or {}
    if not isinstance(remotes, Mapping):
        raise RemoteCredentialsError(f"{source}: `{SECTION}` must map remote names to keys")
    known = remote_urls(project)
    for name, keys in remotes.items():
        where = f"{source}: {SECTION}.{name}"
        if name not in known:
            near = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RemoteCredentialsError(
                f"{where}: no DVC remote {name!r}{hint}; the project's remotes: "
                f"{', '.join(known) or 'none'} (add one with `dvc remote add`)"
            )
        kind = remote_type(known[name])
        allowed = CREDENTIAL_KEYS.get(kind, ())
        if not isinstance(keys, Mapping) or not keys:
            raise RemoteCredentialsError(f"{where}: expected a mapping of {', '.join(allowed)}")
        for key, value in keys.items():
            if key not in allowed:
                raise RemoteCredentialsError(
                    f"{where}.{key}: not a credential of a {kind} remote; expected one of "
                    f"{', '.join(allowed) or '(none: this remote type takes no credentials)'}"
                )
            done = _dvc(["remote", "modify", "--local", str(name), str(key), str(value)], project)
            if done.returncode != 0:
                raise RemoteCredentialsError(f"{where}.{key}: {done.stderr.strip()}")
        check_remote(project, str(name), known[name], where)
    return [str(name) for name in remotes]


def check_remote(project: Path, name: str, url: str, where: str) -> None:
    """List the remote's storage folder with these credentials; fail naming the remote when it
    refuses (an empty or not yet created folder is fine)."""
    from dvc.repo import Repo

    try:
        with Repo(str(project)) as repo:
            remote = repo.cloud.get_remote(name)
            with contextlib.suppress(FileNotFoundError):
                remote.fs.ls(remote.path)
    except Exception as exc:  # the storage library's own error types differ per remote type
        raise RemoteCredentialsError(
            f"DVC remote {name!r} ({url}) refused the credentials of {where}: "
            f"{type(exc).__name__}: {exc}. Check the keys there and run `kedro dvc credentials` "
            "again"
        ) from None
