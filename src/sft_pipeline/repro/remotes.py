"""DVC remotes' credentials from `conf/local/credentials.yml` (`kedro dvc credentials`).

    conf/local/credentials.yml               .dvc/config.local (git-ignored; DVC reads it)
      dvc_remotes:                             ['remote "storage"']
        storage:                     ---->       access_key_id = AKIA...
          access_key_id: AKIA...                 secret_access_key = ...
          secret_access_key: ...

DVC reads a remote's credentials from its own configuration, never from Kedro's. This writes the
ones of `conf/local/credentials.yml` there (through DVC's own config API: what
`dvc remote modify --local` writes), so the committed `.dvc/config` holds only the remote's URL
and options, then lists each remote's storage folder with them: a wrong key is one error naming
the remote here, not a bare "403 Forbidden" at the next `dvc push`.
"""

from __future__ import annotations

import contextlib
import difflib
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


def remote_urls(project: Path) -> dict[str, str]:
    """{remote name: URL} of the project's DVC configuration (every level merged)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {name: conf.get("url", "") for name, conf in repo.config["remote"].items()}


def _write_local(project: Path, name: str, keys: Mapping[str, Any]) -> None:
    """Set `keys` on remote `name` in `.dvc/config.local` (what `dvc remote modify --local`
    writes)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo, repo.config.edit("local") as local:
        local["remote"].setdefault(name, {}).update({k: str(v) for k, v in keys.items()})


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
        for key in keys:
            if key not in allowed:
                raise RemoteCredentialsError(
                    f"{where}.{key}: not a credential of a {kind} remote; expected one of "
                    f"{', '.join(allowed) or '(none: this remote type takes no credentials)'}"
                )
        _write_local(project, str(name), keys)
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
