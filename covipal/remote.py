"""The project's DVC remote: which one a workspace uses, pulling before a pipeline run, pushing after.

The remote holds every cached output in ``dvc.lock`` (data, models, plots, reports) and DVC's
run cache, so a fresh clone or a second machine restores a run's results instead of recomputing
them. ``.dvc/config`` makes ``storage``, the folder ``~/.cache/covipal/dvc-remote``, the default:
outside the workspace, so every clone on the machine shares it, and offline. A clone points it
elsewhere in its git-ignored ``.dvc/config.local`` (``dvc remote modify --local storage url PATH``)
or sets another default remote (S3, GCS, SSH: docs/operations.md). Without any default remote,
pulling and pushing are skipped.

:func:`pull` makes the workspace match ``dvc.lock``: it restores the recorded outputs the remote
has, and puts the recorded version in place of an output that differs from it (left by a failed or
hand-edited run); an output the remote lacks is left to ``dvc repro``. :func:`push`
sends the outputs and the run cache. Both run DVC as a subprocess of this interpreter;
:func:`pull_command` and :func:`push_command` give the command lines for a caller that runs them
itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DVC = [sys.executable, "-m", "dvc"]
HOW = ("point it at a folder with `dvc remote modify --local {name} url /path/to/folder`, "
       "or set another default remote with `dvc remote add --local -d NAME URL`")


class RemoteError(RuntimeError):
    """A DVC pull or push that failed (the remote unreachable, a transfer error); worth a retry."""


class RemoteConfigError(ValueError):
    """A remote that cannot work as configured; the message names it and the fix. Not worth a retry."""


@dataclass(frozen=True)
class Remote:
    name: str
    url: str

    @property
    def local(self) -> bool:
        """Whether the remote is a folder on this machine (no ``scheme://``)."""
        return "://" not in self.url

    def __str__(self) -> str:
        return f"'{self.name}' ({self.url})"


def default_remote(root: str | Path) -> Remote | None:
    """The remote plain ``dvc push`` and ``dvc pull`` use in the project at ``root`` (system, global,
    project and ``.dvc/config.local`` settings merged, as DVC merges them); None when none is set."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(Path(root) / ".dvc"))
    except ConfigError as err:
        raise RemoteConfigError(f"the DVC configuration of {root} is invalid: {err}; see `dvc remote list` "
                                f"and fix .dvc/config or .dvc/config.local") from err
    name = config["core"].get("remote")
    if not name:
        return None
    if name not in config["remote"]:
        raise RemoteConfigError(f"the default DVC remote '{name}' (core.remote) is not defined; define it with "
                                f"`dvc remote add --local {name} URL` or pick one of {sorted(config['remote'])} "
                                f"with `dvc remote default --local NAME`")
    return Remote(name, str(config["remote"][name]["url"]))


def pull_command(root: str | Path, log: Callable[[str], None] = print) -> list[str] | None:
    """The ``dvc pull`` that makes the workspace at ``root`` match ``dvc.lock`` from its default remote,
    or None (with the reason logged) when there is nothing to pull from."""
    remote = default_remote(root)
    if remote is None:
        log("no default DVC remote: nothing to pull (set one up as docs/operations.md says)")
        return None
    if remote.local and not Path(remote.url).is_dir():
        if Path(remote.url).exists():
            raise RemoteConfigError(f"the DVC remote {remote} is not a folder; " + HOW.format(name=remote.name))
        log(f"the DVC remote {remote} holds nothing yet: nothing to pull")
        return None
    log(f"pulling the outputs recorded in dvc.lock from the DVC remote {remote}")
    return [*DVC, "pull", "--allow-missing", "--force"]


def push_command(root: str | Path, log: Callable[[str], None] = print) -> list[str] | None:
    """The ``dvc push`` that sends the cached outputs of ``dvc.lock`` and the run cache of the workspace
    at ``root`` to its default remote, or None (with the reason logged) when there is none."""
    remote = default_remote(root)
    if remote is None:
        log("no default DVC remote: nothing pushed (set one up as docs/operations.md says)")
        return None
    if remote.local:
        check_writable(remote)
    log(f"pushing the outputs recorded in dvc.lock and the run cache to the DVC remote {remote}")
    return [*DVC, "push", "--run-cache"]


def check_writable(remote: Remote) -> None:
    """Refuse a local remote whose folder cannot be made or written, naming it and the fix."""
    folder = Path(remote.url)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise RemoteConfigError(f"the DVC remote {remote} lies under {existing}, which is not a folder; "
                                + HOW.format(name=remote.name))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RemoteConfigError(f"the DVC remote {remote} cannot be written: {existing} is not writable by "
                                f"this user; " + HOW.format(name=remote.name))


def pull(root: str | Path, log: Callable[[str], None] = print, timeout: float | None = None) -> bool:
    """Run :func:`pull_command` in ``root``; True when something was pulled from a remote, False when
    there was no remote to pull from. Raises :class:`RemoteError` when DVC fails."""
    return _run(pull_command(root, log), root, log, timeout, "pull")


def push(root: str | Path, log: Callable[[str], None] = print, timeout: float | None = None) -> bool:
    """Run :func:`push_command` in ``root``; True when pushed, False when there is no remote. Raises
    :class:`RemoteError` when DVC fails."""
    return _run(push_command(root, log), root, log, timeout, "push")


def _run(cmd: list[str] | None, root: str | Path, log: Callable[[str], None], timeout: float | None,
         action: str) -> bool:
    if cmd is None:
        return False
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RemoteError(f"dvc {action} ran longer than {timeout:.0f} s") from err
    output = (done.stdout + done.stderr).strip()
    for line in output.splitlines():
        log(line)
    if done.returncode != 0:
        remote = default_remote(root)
        tail = "\n".join(output.splitlines()[-20:])
        raise RemoteError(f"dvc {action} with the DVC remote {remote} failed (exit {done.returncode}):\n{tail}\n"
                          f"check that the remote is reachable and its credentials are set "
                          f"(`dvc remote list`, docs/operations.md)")
    return True
