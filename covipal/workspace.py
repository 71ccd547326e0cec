"""One writer per workspace: an exclusive lock that the pipeline flow holds for its whole run and
every pipeline stage takes, so a second writer waits its turn instead of failing on DVC's busy outputs.

The lock is ``fcntl.flock`` on ``.dvc/tmp/workspace.lock`` (the kernel drops it when its holder
exits, killed or not). The holder writes who it is into the file and puts a token in
``$COVIPAL_WORKSPACE_LOCK``; processes it starts (``dvc repro`` and the stages DVC runs) inherit
the token and go on without waiting, so the lock is re-entrant per holder and a flow never
waits for itself. A process started by a launcher (``LOCAL_RANK`` set) runs for a stage that
already holds the lock.

Stage exit codes: :data:`CONFIG_ERROR_EXIT` marks a configuration error (a bad ``params.yaml``,
data that fails its checks); rerunning the stage cannot help, so the flow does not retry it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

LOCK_ENV = "COVIPAL_WORKSPACE_LOCK"
LOCK_FILE = Path(".dvc") / "tmp" / "workspace.lock"
CONFIG_ERROR_EXIT = 78  # sysexits.h EX_CONFIG


class WorkspaceBusy(TimeoutError):
    """The workspace stayed locked by another writer for longer than the caller would wait."""


def config_error(err: Exception) -> None:
    """Exit with ``err`` named and :data:`CONFIG_ERROR_EXIT`, the code the flow does not retry."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(CONFIG_ERROR_EXIT)


class WorkspaceLock:
    """The exclusive lock of the workspace at ``root``; ``holder`` says who takes it (shown to waiters)."""

    def __init__(self, root: str | Path, holder: str, log: Callable[[str], None] | None = None):
        self.path = Path(root) / LOCK_FILE
        self.holder = holder
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._fd: int | None = None
        self._saved_env: str | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def info(self) -> dict:
        """What the current holder wrote into the lock file ({} when none did)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, timeout: float | None = None, poll: float = 1.0) -> "WorkspaceLock":
        """Take the lock, waiting for the current writer; :class:`WorkspaceBusy` after ``timeout`` s."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    self.log(f"waiting for the workspace {self.path.parents[2]}: {describe(self.info())}")
                    told = True
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise WorkspaceBusy(
                        f"the workspace {self.path.parents[2]} stayed busy for {timeout:.0f} s: "
                        f"{describe(self.info())}; wait for it to finish or stop it") from None
                time.sleep(poll)
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        record = {"token": token, "holder": self.holder, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        self._saved_env = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = token
        if told:
            self.log(f"the workspace is free: {self.holder} goes on")
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if self._saved_env is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = self._saved_env
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> "WorkspaceLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe(info: dict) -> str:
    if not info:
        return "held by a process that did not say who it is"
    return (f"held by {info.get('holder', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


def held_by_parent(root: str | Path) -> bool:
    """Whether this process runs for the holder of the lock: its token is the holder's, or a
    launcher started it for a stage (which holds the lock)."""
    if "LOCAL_RANK" in os.environ:
        return True
    token = os.environ.get(LOCK_ENV)
    return bool(token) and WorkspaceLock(root, "").info().get("token") == token and _locked(Path(root) / LOCK_FILE)


def _locked(path: Path) -> bool:
    """Whether some process holds the flock on ``path`` (probed without keeping it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


_HELD: list[WorkspaceLock] = []


def hold_workspace(root: str | Path, stage: str) -> None:
    """Take the workspace for stage ``stage`` until this process exits (a stage is one process),
    waiting while another writer holds it; nothing to do when the process that started this one
    holds it."""
    if not held_by_parent(root):
        _HELD.append(WorkspaceLock(root, f"stage '{stage}' (pid {os.getpid()})").acquire())


def other_dvc(root: str | Path) -> list[str]:
    """DVC processes at work in the workspace now (its repo lock or output locks held), as
    "pid: command" lines; the caller's own DVC calls must have ended."""
    tmp = Path(root) / ".dvc" / "tmp"
    found: dict[int, str] = {}
    try:
        locks = json.loads((tmp / "rwlock").read_text() or "{}")
    except (OSError, ValueError):
        locks = {}
    for infos in [*locks.get("write", {}).values(), *locks.get("read", {}).values()]:
        for info in infos if isinstance(infos, list) else [infos]:
            found[int(info["pid"])] = info.get("cmd", "dvc")
    if _locked(tmp / "lock"):
        try:
            found.setdefault(int((tmp / "lock").read_text().strip()), "dvc")
        except (OSError, ValueError):
            found.setdefault(-1, "dvc (repo lock held)")
    return [f"{pid}: {cmd}" for pid, cmd in found.items()
            if pid != os.getpid() and (pid < 0 or _alive(pid))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m covipal.workspace <command>``: run a command (``dvc repro``, ``dvc exp run``) as the
    workspace's writer, after waiting for the one at work now."""
    import subprocess

    cmd = list(sys.argv[1:] if argv is None else argv)
    if not cmd:
        print("usage: python -m covipal.workspace <command> [args]   e.g. dvc repro, dvc exp run", file=sys.stderr)
        return 2
    with WorkspaceLock(Path.cwd(), " ".join(cmd)):
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
